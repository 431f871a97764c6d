"""Import an insightface arcface_torch model: a checkpoint the meta stage starts from, and a SavedModel.

    python tools/import_arcface_torch.py --checkpoint=backbone.pth --out_dir=imported/r100
    python tools/import_arcface_torch.py --checkpoint=checkpoint_gpu_0.pt \
        --partial_fc=checkpoint_gpu_0.pt,checkpoint_gpu_1.pt,...,checkpoint_gpu_7.pt --out_dir=imported/r100

Writes <out_dir>/checkpoint/ (backbone, and the identity head when --partial_fc gives every rank's
centres; `--init_checkpoint=<out_dir>/checkpoint`), <out_dir>/export/ (SavedModel, `images` uint8 ->
`embedding`), <out_dir>/model.cfg (the architecture flags and --init_checkpoint, for --flagfile) and
<out_dir>/import.json. PyTorch is not needed: the files are read by a restricted unpickler.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("checkpoint", None, "arcface_torch backbone state dict (backbone.pth, model.pt) or a "
                        "checkpoint_gpu_<rank>.pt.", required=True)
    flags.DEFINE_list("partial_fc", [], "Every rank's checkpoint_gpu_<rank>.pt: their Partial FC centres, joined in "
                      "rank order, become the identity head (the .rec label order). Empty: no identity head "
                      "(train one with --head_warmup_steps).")
    flags.DEFINE_enum("backbone", None, ["iresnet18", "iresnet34", "iresnet50", "iresnet100"], "Expected depth "
                      "(checked against the file; read from it when not given).")
    flags.DEFINE_float("width_multiplier", None, "Expected width multiplier (checked; read from the file if not given).")
    flags.DEFINE_integer("embedding_size", None, "Expected embedding size (checked; read from the file if not given).")
    flags.DEFINE_string("out_dir", None, "Output folder.", required=True)


def main(argv) -> int:
    del argv
    import tensorflow as tf

    from mvcom_tf.export import export_saved_model
    from mvcom_tf.models import arcface_torch, torch_checkpoint
    from mvcom_tf.models.heads import MarginHead

    try:
        backbone, architecture = arcface_torch.load_model_file(FLAGS.checkpoint)
        expected = {"backbone": FLAGS.backbone, "width_multiplier": FLAGS.width_multiplier,
                    "embedding_size": FLAGS.embedding_size}
        for name, value in expected.items():
            if value is not None and value != getattr(architecture, name):
                raise torch_checkpoint.CheckpointError(f"{FLAGS.checkpoint}: --{name}={value}, but the file holds "
                                                       f"{getattr(architecture, name)}")
        paths = sorted(FLAGS.partial_fc, key=lambda p: (arcface_torch.rank_of(p) is None, arcface_torch.rank_of(p)))
        shards = [torch_checkpoint.load(path).get("state_dict_softmax_fc", {}).get("weight") for path in paths]
        for path, shard in zip(paths, shards):
            if shard is None:
                raise torch_checkpoint.CheckpointError(f"{path}: no state_dict_softmax_fc.weight (Partial FC centres)")
        centres = arcface_torch.join_partial_fc(shards, paths) if shards else None
    except (torch_checkpoint.CheckpointError, FileNotFoundError, tf.errors.NotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    trackables = {"backbone": backbone}
    if centres is not None:
        head = MarginHead(len(centres), name="identity_head")
        head.build((None, architecture.embedding_size))
        head.kernel.assign(centres.T)
        trackables["head"] = head
    checkpoint_dir = posixpath.join(FLAGS.out_dir, "checkpoint")
    tf.train.Checkpoint(**trackables).save(posixpath.join(checkpoint_dir, "ckpt"))
    export_dir = export_saved_model(backbone, posixpath.join(FLAGS.out_dir, "export"), architecture.image_size)
    cfg = architecture.flags() + [f"--init_checkpoint={checkpoint_dir}"]
    with tf.io.gfile.GFile(posixpath.join(FLAGS.out_dir, "model.cfg"), "w") as f:
        f.write("# Written by tools/import_arcface_torch.py: the imported network's flags.\n" + "\n".join(cfg) + "\n")
    summary = {"checkpoint": FLAGS.checkpoint, "partial_fc": paths, "architecture": architecture.__dict__,
               "num_classes": None if centres is None else len(centres), "init_checkpoint": checkpoint_dir,
               "export_dir": export_dir, "input": "stem kernel scaled by 128/127.5: arcface_torch's (x - 127.5) / "
                                                  "127.5 expressed on this project's (x - 127.5) / 128"}
    with tf.io.gfile.GFile(posixpath.join(FLAGS.out_dir, "import.json"), "w") as f:
        json.dump(summary, f, indent=1)
    heads = f"identity head of {len(centres)} classes" if centres is not None else "no identity head"
    print(f"imported {architecture.backbone} (width x{architecture.width_multiplier:g}, "
          f"{architecture.embedding_size}-d, {architecture.image_size} px), {heads}: {checkpoint_dir}, {export_dir}; "
          f"train with --flagfile={posixpath.join(FLAGS.out_dir, 'model.cfg')}")
    return 0


if __name__ == "__main__":
    define_flags()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(app.run(main))
