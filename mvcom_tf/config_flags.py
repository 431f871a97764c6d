"""The absl flags of `mvcom_tf.train`, defined and validated from the fields of TrainConfig's parts."""

from __future__ import annotations

import dataclasses
import os
import typing

from absl import flags

from mvcom_tf.config import FACTOR_LIST, FINE_TUNING_STAGES, STAGE_NAMES, TrainConfig, flag_fields
from mvcom_tf.evaluation.benchmark_spec import KINDS, parse_benchmark

# The CPU demo's recipe: applied when the command names neither --train_data nor a flagfile.
DEMO_FLAGFILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flags", "demo.cfg")


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines one flag per config field, with its default, help text, bounds and validators."""
    for name, part, field in flag_fields():
        _define(name, field, _field_type(part, field), flag_values)
    _register_validators(flag_values)


def _field_type(part: str, field: dataclasses.Field) -> type:
    part_class = TrainConfig.__dataclass_fields__[part].default_factory
    return typing.get_type_hints(part_class)[field.name]


def _define(name: str, field: dataclasses.Field, kind: type, flag_values: flags.FlagValues) -> None:
    meta, default = field.metadata, field.default
    common = {"name": name, "help": meta["help"], "flag_values": flag_values}
    if meta["choices"] and kind is str:
        flags.DEFINE_enum(default=default, enum_values=[*meta["choices"], *meta["aliases"]], **common)
    elif kind is bool:
        flags.DEFINE_bool(default=default, **common)
    elif kind is int:
        flags.DEFINE_integer(default=default, lower_bound=meta["lower"], upper_bound=meta["upper"], **common)
    elif kind is float:
        flags.DEFINE_float(default=default, lower_bound=meta["lower"], upper_bound=meta["upper"], **common)
    elif kind is str:
        flags.DEFINE_string(default=default, **common)
    elif typing.get_origin(kind) is tuple:
        flags.DEFINE_list(default=[_format(value) for value in default], **common)
        if typing.get_args(kind)[0] is float:
            length = meta["length"]
            message = (f"--{name} must be {length} numbers {FACTOR_LIST}" if length
                       else f"--{name} must be a comma-separated list of numbers")
            flags.register_validator(name, lambda values, n=length: _numbers(values) and (not n or len(values) == n),
                                     message, flag_values=flag_values)
    else:
        raise TypeError(f"--{name}: no flag type for {kind}")


def _format(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _numbers(values: list[str]) -> bool:
    try:
        [float(value) for value in values]
    except ValueError:
        return False
    return True


def _is_benchmark(spec: str) -> bool:
    try:
        parse_benchmark(spec)
    except ValueError:
        return False
    return True


def _register_validators(flag_values: flags.FlagValues) -> None:
    register, register_multi = flags.register_validator, flags.register_multi_flags_validator
    register("stage", lambda v: bool(v) and all(s in STAGE_NAMES for s in v) and len(set(v)) == len(v),
             f"--stage must list some of {', '.join(STAGE_NAMES)}, each once", flag_values=flag_values)
    register("eval_data", lambda v: all(_is_benchmark(spec) for spec in v),
             f"--eval_data entries must be <kind>:<path> with a kind among {', '.join(KINDS)}, or a synthetic test "
             "split's folder", flag_values=flag_values)
    register("image_size", lambda v: v % 16 == 0, "--image_size must be divisible by 16", flag_values=flag_values)
    register_multi(["mixed_precision", "stage"],
                   lambda f: not (f["mixed_precision"] == "float16" and set(FINE_TUNING_STAGES) & set(f["stage"])),
                   "--mixed_precision=float16 trains the pretrain stage only (the meta step's second-order "
                   "gradients are not loss-scaled): use --mixed_precision=bfloat16 with --stage=meta",
                   flag_values=flag_values)
    register_multi(["fused_bn", "stage"], lambda f: not (f["fused_bn"] and "meta" in f["stage"]),
                   "--fused_bn is for the pretrain and finetune stages: TensorFlow's second derivative of the fused "
                   "BatchNorm kernel is not exact (4% off in tests/test_iresnet.py), and the meta stage "
                   "differentiates through its gradient; run --stage=meta without it", flag_values=flag_values)
    register_multi(["jit_compile", "strategy"], lambda f: not (f["jit_compile"] and f["strategy"] != "default"),
                   "--jit_compile needs --strategy=default (one device per process)", flag_values=flag_values)
    register_multi(["export", "export_tflite", "export_onnx"],
                   lambda f: f["export"] or not (f["export_tflite"] or f["export_onnx"]),
                   "--export_tflite and --export_onnx convert the SavedModel: they need --export",
                   flag_values=flag_values)
    register_multi(["margin_min", "margin_max"], lambda f: f["margin_min"] <= f["margin_max"],
                   "--margin_min must not exceed --margin_max", flag_values=flag_values)
    register_multi(["head_sharding", "head_warmup_steps"],
                   lambda f: f["head_sharding"] != "sharded" or not f["head_warmup_steps"],
                   "--head_warmup_steps needs --head_sharding=replicated (the warm-up trains a replicated head with "
                   "its own Keras optimizer)", flag_values=flag_values)
    register_multi(["head_sharding", "nan_policy"],
                   lambda f: f["head_sharding"] != "sharded" or f["nan_policy"] != "skip",
                   "--nan_policy=skip needs --head_sharding=replicated (a skipped step is not built for the "
                   "sharded centres' own SGD)", flag_values=flag_values)
    register_multi(["head_sharding", "mixed_precision"],
                   lambda f: f["head_sharding"] != "sharded" or f["mixed_precision"] != "float16",
                   "--head_sharding=sharded does not take float16's loss scaling: use --mixed_precision=bfloat16",
                   flag_values=flag_values)
    register_multi(["head_sharding", "partial_fc_rate"],
                   lambda f: f["head_sharding"] == "sharded" or f["partial_fc_rate"] == 1.0,
                   "--partial_fc_rate below 1 needs --head_sharding=sharded", flag_values=flag_values)
    register_multi(["loss_weighting", "meta_target"],
                   lambda f: not (f["loss_weighting"] == "groupdro" and f["meta_target"] in ("weights", "both")),
                   "--loss_weighting=groupdro moves its weights with each step's losses, so learned weights "
                   "(--meta_target=weights or both) cannot be normalised under them: use one of the two, or "
                   "--loss_weighting=balanced or error_set", flag_values=flag_values)
    register_multi(["meta_data", "stage"],
                   lambda f: bool(f["meta_data"]) or not set(FINE_TUNING_STAGES) & set(f["stage"]),
                   "--stage=meta needs --meta_data (a dataset folder with variation labels; so does finetune, "
                   "its control)", flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues) -> TrainConfig:
    """The parsed flags as a TrainConfig."""
    values = {}
    for name, part, field in flag_fields():
        value, kind = flag_values[name].value, _field_type(part, field)
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            value = tuple(item(v) for v in value)
        values[name] = value
    return TrainConfig.from_flags(**values)


def parse_config(argv: list[str]) -> TrainConfig:
    """Flag strings (e.g. ["--flagfile=flags/demo.cfg", "--seed=1"]) as a TrainConfig: for tests and notebooks.

    Parsed into their own FlagValues, so the process's absl FLAGS are left alone.
    """
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["mvcom_tf.train", *argv])
    return config_from_flags(flag_values)


def config_of_run(model_dir: str, *overrides: str) -> TrainConfig:
    """The TrainConfig a run folder was trained with (its flags.txt), with `overrides` (flag strings) on top."""
    import tensorflow as tf  # here, not at the top: the flag definitions stay light to import

    path = os.path.join(model_dir, "flags.txt")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{model_dir} is not a run folder: it has no flags.txt")
    names = {name for name, _, _ in flag_fields()}
    with tf.io.gfile.GFile(path) as f:
        # flags.txt holds absl's own flags too: keep the run's (a false bool is written --noname).
        kept = [line.strip() for line in f if line.startswith("--") and _flag_name(line.strip()) in names]
    return parse_config([*kept, *overrides])


def _flag_name(arg: str) -> str:
    name = arg[2:].split("=", 1)[0]
    return name[2:] if name.startswith("no") and name[2:] in BOOL_FLAGS else name


BOOL_FLAGS = frozenset(name for name, _, field in flag_fields() if field.type in (bool, "bool"))


def flag_sources(argv: list[str]) -> dict[str, list[str]]:
    """Which flags the command set, keyed by where they came from: each --flagfile, then the command line."""
    sources: dict[str, list[str]] = {}
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name == "flagfile":
            path = arg.split("=", 1)[1]
            if not os.path.exists(path):
                continue  # absl's parser names it
            with open(path) as f:
                names = [line.strip()[2:].split("=", 1)[0] for line in f if line.strip().startswith("--")]
            sources[path] = names
        else:
            sources.setdefault("the command line", []).append(name)
    return sources
