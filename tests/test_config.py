"""TrainConfig, the one source of the flags: the paper's defaults, the demo recipe, what --train_data alone does."""

import ast
import dataclasses
import json
import pathlib

import pytest
from absl import flags

from mvcom_tf.config import TrainConfig, flag_fields
from mvcom_tf.config_flags import DEMO_FLAGFILE, define_flags, flag_sources, parse_config
from mvcom_tf.train import with_demo_unless_data
from tests.helpers import DEMO, REPO, run_module


def test_every_field_of_every_part_is_a_flag_with_the_fields_default():
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    named = list(flag_fields())
    assert len(named) == len({name for name, _, _ in named}) == 78
    assert {name for name, _, _ in named} <= set(flag_values)
    parsed = parse_config(["--train_data=x"])
    for name, part, field in named:
        expected = "x" if name == "train_data" else field.default
        assert getattr(getattr(parsed, part), field.name) == expected, name
        assert flag_values[name].help.endswith(field.metadata["help"]), name
    # A flag named differently from its field reaches that field, and replacing by flag name keeps the rest.
    tuned = parse_config(["--train_data=x", "--meta_lr_tau=12", "--meta_epochs=3", "--stage=pretrain,meta",
                          "--meta_data=m"])
    assert (tuned.meta.tau, tuned.finetune.epochs, tuned.pretrain.epochs) == (12.0, 3, 30)
    assert tuned.runtime.stages == ("pretrain", "meta") and tuned.schedule("meta") == tuned.finetune
    assert tuned.with_flags(meta_lr_tau=0.0) == dataclasses.replace(tuned, meta=dataclasses.replace(tuned.meta,
                                                                                                    tau=0.0))
    assert TrainConfig.from_flags(train_data="x", meta_lr_tau=12.0, meta_epochs=3, stage=("pretrain", "meta"),
                                  meta_data="m") == tuned
    with pytest.raises(KeyError):
        TrainConfig.from_flags(meta_tau=1.0)


def test_a_renamed_choice_keeps_its_old_spelling():
    """--meta_scope=head, from before `output_block` was its name, still means the output block."""
    for old in (parse_config(["--train_data=x", "--meta_scope=head"]), TrainConfig.from_flags(meta_scope="head")):
        assert old.meta.scope == "output_block"
    assert parse_config(["--train_data=x", "--meta_scope=output_block"]).meta.scope == "output_block"
    with pytest.raises(flags.IllegalFlagValueError, match=r"one of <all\|output_block\|head>"):
        parse_config(["--train_data=x", "--meta_scope=trunk"])


def test_the_defaults_are_the_papers_and_the_demo_is_a_flagfile():
    config = parse_config(["--train_data=x"])
    assert (config.model.backbone, config.model.width_multiplier, config.model.embedding_size,
            config.head.scale) == ("iresnet100", 1.0, 512, 64.0)
    assert (config.runtime.stages, config.evaluation.benchmarks, config.data.meta_data,
            config.model.image_size) == (("pretrain",), (), "", 112)
    demo = parse_config([DEMO])
    assert (demo.model.width_multiplier, demo.model.embedding_size, demo.head.scale, demo.model.image_size) == (
        0.25, 128, 16.0, 32)
    assert demo.runtime.stages == ("pretrain", "finetune", "meta")
    assert demo.evaluation.benchmarks == ("data/synthetic/test",)
    assert demo.finetune.lr_steps == () and (demo.runtime.checkpoint_every, demo.runtime.log_every) == (200, 20)
    # The demo fine-tunes with the bias study's recipe; its MvCoM flagfile differs only in the meta stage's lever.
    assert (demo.data.train_sampling, demo.head.margin_prior, demo.meta.tau) == ("balanced", "constant", 0.0)
    assert parse_config([f"--flagfile={REPO}/flags/demo_mvcom.cfg"]) == demo.with_flags(
        train_sampling="natural", margin_prior="volume", meta_lr_tau=1000.0, model_dir="runs/demo_mvcom")
    demo_file = f"--flagfile={DEMO_FLAGFILE}"
    assert with_demo_unless_data(["mvcom-train"]) == ["mvcom-train", demo_file]
    # The demo's flags first, so that the command's own win.
    assert with_demo_unless_data(["mvcom-train", "--seed=1"]) == ["mvcom-train", demo_file, "--seed=1"]
    for own in (["--train_data=x"], ["--flagfile=flags/bias_study.cfg"], ["--helpfull"]):
        assert with_demo_unless_data(["mvcom-train", *own]) == ["mvcom-train", *own]


def test_flag_sources_name_the_flagfile_and_the_command_line():
    sources = flag_sources([f"--flagfile={DEMO_FLAGFILE}", "--seed=3", "--nodeterministic"])
    assert sources[DEMO_FLAGFILE][:3] == ["train_data", "meta_data", "eval_data"]
    assert sources["the command line"] == ["seed", "nodeterministic"]


@pytest.mark.parametrize("argv,message", [
    (["--train_data=x", "--stage=pretrain,meta"], "--stage=meta needs --meta_data"),
    (["--train_data=x", "--factor_weights=1,2"], "--factor_weights must be 4 numbers"),
    (["--train_data=x", "--lr_steps=8,eleven"], "--lr_steps must be a comma-separated list of numbers"),
    (["--train_data=x", "--noexport", "--export_onnx"], "--export_tflite and --export_onnx convert the SavedModel"),
    (["--train_data=x", "--loss_weighting=groupdro", "--meta_target=both"], "cannot be normalised under them"),
])
def test_inconsistent_flags_are_refused_by_name(argv, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        parse_config(argv)


def test_train_data_alone_trains_a_full_width_512d_network_on_it_and_nothing_else(tmp_path, tiny_data):
    # Only what the CPU cannot afford is shrunk (depth, input size, batch, one step): no width,
    # embedding, stage, meta set or benchmark is given, and none is used.
    run_dir = tmp_path / "run"
    result = run_module(["-m", "mvcom_tf.train", f"--train_data={tiny_data}/train", "--backbone=iresnet18",
                         "--image_size=32", "--batch_size=16", "--max_steps=1", f"--model_dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "flags from the command line: train_data, backbone, image_size, batch_size, max_steps, model_dir" \
        in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["pretrain"]
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == ["pretrain"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["pretrain"] and "accuracy" not in metrics
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "pretrain"))
    shapes = reader.get_variable_to_shape_map()
    assert shapes["head/kernel/.ATTRIBUTES/VARIABLE_VALUE"] == [512, 60]  # 512-d, the 60 identities of X
    # Keras 3 checkpoints keep trainable weights under the optimizer's tracked variables.
    kernels = [shape for shape in shapes.values() if len(shape) == 4]
    assert [3, 3, 3, 64] in kernels and [3, 3, 512, 512] in kernels  # full width: stem 64, last stage 512


def test_a_flagfile_without_train_data_asks_for_it(tmp_path):
    flagfile = tmp_path / "recipe.cfg"
    flagfile.write_text("--backbone=iresnet18\n")
    result = run_module(["-m", "mvcom_tf.train", f"--flagfile={flagfile}", f"--model_dir={tmp_path}/run"])
    assert result.returncode != 0
    assert "--train_data is required" in result.stderr and "Traceback" not in result.stderr


TRAINING_LOOP = pathlib.Path(REPO, "mvcom_tf", "training")


def test_the_training_loop_is_small_and_knows_no_stage():
    for path in TRAINING_LOOP.glob("*.py"):
        text = path.read_text()
        assert "meta" not in text.lower(), path.name
        assert len(text.splitlines()) <= 250, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 50, (path.name, node.name)


def test_no_module_edits_sys_path():
    needle = "sys.path" + ".insert"  # not spelled out, so that this file does not match
    for folder in ("mvcom_tf", "tools", "benchmarks", "tests"):
        for path in pathlib.Path(REPO, folder).rglob("*.py"):
            assert needle not in path.read_text(), path


def test_no_module_defines_flags_on_import():
    """Flags are defined by the command that reads them, so importing a module (a test, a notebook) adds none."""
    for folder in ("mvcom_tf", "tools", "benchmarks"):
        for path in pathlib.Path(REPO, folder).rglob("*.py"):
            for statement in ast.parse(path.read_text()).body:
                if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
                    called = ast.unparse(statement.value.func)
                    assert not called.startswith(("flags.DEFINE", "flags.register", "flags.mark")), (path, called)
