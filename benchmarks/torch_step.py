"""The reference step in PyTorch: insightface's IResNet + CosFace + SGD, timed like benchmarks.timed_steps.

    python -m benchmarks.torch_step --backbone=iresnet100 --precision=bfloat16 [--channels_last]

PyTorch is a dependency of this benchmark only (`pip install -r benchmarks/requirements-pytorch.txt`),
never of the package; `benchmarks.train_step --pytorch` runs it beside our step. The network follows
the published architecture of arcface_torch's `iresnet.py` (BN-conv3x3-BN-PReLU-conv3x3(stride)-BN
blocks, a 1x1 projection on the shortcut, BN-dropout-flatten-FC-BN(scale fixed at 1) output); the
head is arcface_torch's CosFace on L2-normalised weights, the optimizer SGD with momentum 0.9 and
weight decay 5e-4, as in its recipes. bfloat16 is `torch.autocast("cpu", torch.bfloat16)`, the
CPU counterpart of arcface_torch's fp16 autocast. Prints one JSON object like time_step's.
"""

from __future__ import annotations

import json
import resource
import statistics
from absl import app, flags

from benchmarks.timed_steps import call_seconds

FLAGS = flags.FLAGS
STAGE_BLOCKS = {"iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}


def build(backbone: str, image_size: int, embedding_size: int = 512):
    """The IResNet as an nn.Module (imports torch here: the module is importable without it)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int) -> None:
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
            self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
            self.prelu = nn.PReLU(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
            self.downsample = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                                nn.BatchNorm2d(planes, eps=1e-5))

        def forward(self, x):
            out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return out + (x if self.downsample is None else self.downsample(x))

    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64, eps=1e-5), nn.PReLU(64)]
    inplanes = 64
    for blocks, planes in zip(STAGE_BLOCKS[backbone], (64, 128, 256, 512)):
        for index in range(blocks):
            layers.append(Block(inplanes, planes, 2 if index == 0 else 1))
            inplanes = planes
    side = image_size // 16
    features = nn.BatchNorm1d(embedding_size, eps=1e-5)
    nn.init.constant_(features.weight, 1.0)
    features.weight.requires_grad = False
    layers += [nn.BatchNorm2d(512, eps=1e-5), nn.Dropout(0.0), nn.Flatten(),
               nn.Linear(512 * side * side, embedding_size), features]
    return torch.nn.Sequential(*layers)


def time_torch_step(backbone: str = "iresnet100", image_size: int = 112, batch: int = 8, num_classes: int = 1000,
                    precision: str = "float32", channels_last: bool = False, repeats: int = 5,
                    warmup: int = 2) -> dict:
    """Median seconds of one training step after warm-up, and the process's peak resident memory."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build(backbone, image_size)
    weight = torch.nn.Parameter(torch.randn(num_classes, 512) * 0.01)
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, num_classes, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD([{"params": [p for p in model.parameters() if p.requires_grad]},
                                 {"params": [weight]}], lr=0.1, momentum=0.9, weight_decay=5e-4)
    scale, margin = 64.0, 0.35

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            embeddings = model(images)
        cosine = F.linear(F.normalize(embeddings.float()), F.normalize(weight))
        logits = scale * (cosine - margin * F.one_hot(labels, num_classes))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = call_seconds(step, repeats, warmup)
    median = statistics.median(seconds)
    return {"kind": "pytorch", "seconds": median, "images_per_s": batch / median, "all_seconds": seconds,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_enum("backbone", "iresnet100", sorted(STAGE_BLOCKS), "The IResNet.")
    flags.DEFINE_integer("image_size", 112, "Image size.")
    flags.DEFINE_integer("batch", 8, "Batch size.")
    flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "bfloat16: torch.autocast on the CPU.")
    flags.DEFINE_bool("channels_last", False, "The network and images in channels-last memory format.")
    flags.DEFINE_integer("repeats", 5, "Timed steps (after 2 warm-up steps).")


def main(argv) -> None:
    del argv
    print(json.dumps(time_torch_step(FLAGS.backbone, FLAGS.image_size, FLAGS.batch, precision=FLAGS.precision,
                                     channels_last=FLAGS.channels_last, repeats=FLAGS.repeats)))


if __name__ == "__main__":
    define_flags()
    app.run(main)
