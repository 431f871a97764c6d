"""insightface arcface_torch models in this project: an IResNet state dict onto the Keras IResNet, and the
Partial FC class centres of every rank joined into the identity head."""

from __future__ import annotations

import collections
import dataclasses
import re

import keras
import numpy as np

from mvcom_tf.models.iresnet import OUTPUT_BLOCK_PREFIX, STAGE_BLOCKS, STAGE_WIDTHS, build_iresnet
from mvcom_tf.models.torch_checkpoint import CheckpointError

# arcface_torch feeds (x / 255 - 0.5) / 0.5 = (x - 127.5) / 127.5; this project (x - 127.5) / 128. The means
# agree and the stem convolution is linear without bias, so scaling its kernel by 128 / 127.5 makes the
# network give PyTorch's embeddings on this project's input, exactly, wherever it runs.
INPUT_SCALE = 128.0 / 127.5
_BATCH_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the training flags must say to build the network a state dict holds."""

    backbone: str
    width_multiplier: float
    embedding_size: int
    image_size: int

    def flags(self) -> list[str]:
        return [f"--backbone={self.backbone}", f"--width_multiplier={self.width_multiplier:g}",
                f"--embedding_size={self.embedding_size}", f"--image_size={self.image_size}"]

    def build(self) -> keras.Model:
        return build_iresnet(self.backbone, self.image_size, self.embedding_size, self.width_multiplier)


def infer_architecture(state_dict: dict, path: str = "state dict") -> Architecture:
    """The IResNet depth, width, embedding size and input size of an arcface_torch backbone state dict."""
    for key in ("conv1.weight", "fc.weight"):
        if key not in state_dict:
            raise CheckpointError(f"{path}: no {key}: not an arcface_torch IResNet backbone state dict")
    blocks = tuple(len({key.split(".")[1] for key in state_dict if key.startswith(f"layer{stage}.")})
                   for stage in range(1, 5))
    names = [name for name, stage_blocks in STAGE_BLOCKS.items() if stage_blocks == blocks]
    if not names:
        raise CheckpointError(f"{path}: blocks per stage {blocks} match no IResNet ({STAGE_BLOCKS})")
    width = state_dict["conv1.weight"].shape[0] / STAGE_WIDTHS[0]
    last_channels = max(1, int(round(STAGE_WIDTHS[-1] * width)))
    embedding_size, flat = state_dict["fc.weight"].shape
    side = int(round(np.sqrt(flat / last_channels)))
    if side * side * last_channels != flat:
        raise CheckpointError(f"{path}: fc.weight has {flat} inputs, not {last_channels} channels on a square map")
    return Architecture(names[0], width, int(embedding_size), side * 16)


def _torch_prefix(layer_name: str) -> str:
    """The state dict prefix of a Keras IResNet layer (stage2_block3_bn1 -> layer2.2.bn1)."""
    fixed = {"stem_conv": "conv1", "stem_bn": "bn1", "stem_prelu": "prelu", f"{OUTPUT_BLOCK_PREFIX}bn": "bn2",
             f"{OUTPUT_BLOCK_PREFIX}fc": "fc", f"{OUTPUT_BLOCK_PREFIX}features": "features"}
    if layer_name in fixed:
        return fixed[layer_name]
    match = re.fullmatch(r"stage(\d)_block(\d+)_(\w+)", layer_name)
    if not match:
        raise ValueError(f"no arcface_torch name for layer {layer_name}")
    stage, block, part = match.groups()
    part = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(part, part)
    return f"layer{stage}.{int(block) - 1}.{part}"


def _keras_weights(layer: keras.layers.Layer, tensors: dict[str, np.ndarray], image_size: int) -> list[np.ndarray]:
    """A layer's weights, in Keras' order and layout, from its state dict tensors (keyed without prefix)."""
    if isinstance(layer, keras.layers.Conv2D):
        return [tensors["weight"].transpose(2, 3, 1, 0)]  # OIHW -> HWIO
    if isinstance(layer, keras.layers.PReLU):
        return [tensors["weight"].reshape(1, 1, -1)]
    if isinstance(layer, keras.layers.BatchNormalization):
        gamma, beta, mean, variance = (tensors[key] for key in _BATCH_NORM_KEYS)
        if layer.scale:
            return [gamma, beta, mean, variance]
        if not np.allclose(gamma, 1.0):
            raise CheckpointError(f"{layer.name}: the embedding BatchNorm's weight is not 1 (insightface fixes it)")
        return [beta, mean, variance]
    if isinstance(layer, keras.layers.Dense):
        # PyTorch flattens [C, H, W], Keras [H, W, C].
        weight = tensors["weight"]
        side = image_size // 16
        channels = weight.shape[1] // (side * side)
        kernel = weight.reshape(-1, channels, side, side).transpose(2, 3, 1, 0).reshape(side * side * channels, -1)
        return [kernel, tensors["bias"]]
    raise ValueError(f"no mapping for layer {layer.name} ({type(layer).__name__})")


def load_backbone(state_dict: dict, path: str = "state dict", architecture: Architecture | None = None
                  ) -> tuple[keras.Model, Architecture]:
    """The Keras IResNet holding an arcface_torch backbone state dict (stem scaled for this project's input).

    Every tensor must find its variable and every variable its tensor: otherwise the error lists
    the keys left over and missing, and nothing is returned.
    """
    found = infer_architecture(state_dict, path)
    if architecture is not None and architecture != found:
        raise CheckpointError(f"{path}: holds {found}, not the {architecture} asked for")
    backbone = found.build()
    by_prefix: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "num_batches_tracked":
            by_prefix[prefix][leaf] = np.asarray(value, np.float32)
    missing, assignments = [], []
    for layer in backbone.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        tensors = by_prefix.pop(prefix, {})
        try:
            weights = _keras_weights(layer, tensors, found.image_size)
        except KeyError as error:
            missing.append(f"{prefix}.{error.args[0]}")
            continue
        if layer.name == "stem_conv":
            weights = [weights[0] * INPUT_SCALE]
        assignments.append((layer, weights))
    left_over = [f"{prefix}.{leaf}" for prefix, tensors in by_prefix.items() for leaf in tensors]
    if missing or left_over:
        raise CheckpointError(f"{path}: the state dict does not match {found.backbone}: missing {missing or 'none'}; "
                              f"left over {left_over or 'none'}")
    for layer, weights in assignments:
        layer.set_weights(weights)
    return backbone, found


def partial_fc_rank_sizes(num_classes: int, world_size: int) -> list[int]:
    """Classes held by each rank in partial_fc_v2: C // W + (rank < C % W)."""
    return [num_classes // world_size + int(rank < num_classes % world_size) for rank in range(world_size)]


def join_partial_fc(shards: list[np.ndarray], paths: list[str]) -> np.ndarray:
    """The class centres [C, E] in label order from every rank's Partial FC weight, given in rank order."""
    ranks = [rank_of(path) for path in paths]
    if None not in ranks and ranks != list(range(len(paths))):
        raise CheckpointError(f"Partial FC files of ranks {ranks} ({', '.join(paths)}): every rank from 0 to the "
                              "last is needed, each once")
    sizes = [len(shard) for shard in shards]
    expected = partial_fc_rank_sizes(sum(sizes), len(shards))
    if sizes != expected:
        raise CheckpointError(f"Partial FC weights of {sizes} classes per file ({', '.join(paths)}) are not "
                              f"partial_fc_v2's split of {sum(sizes)} classes over {len(shards)} ranks ({expected}): "
                              "give every rank's checkpoint_gpu_<rank>.pt")
    return np.concatenate(shards, axis=0)


def rank_of(path: str) -> int | None:
    """The rank in a file named like arcface_torch's checkpoint_gpu_<rank>.pt, else None."""
    match = re.search(r"checkpoint_gpu_(\d+)\.pt$", path)
    return int(match.group(1)) if match else None


def backbone_state_dict(checkpoint: dict | collections.OrderedDict, path: str) -> dict:
    """The backbone state dict of a file: a bare state dict (backbone.pth, model.pt) or arcface_torch's
    full-state checkpoint_gpu_<rank>.pt (its `state_dict_backbone`)."""
    if "state_dict_backbone" in checkpoint:
        checkpoint = checkpoint["state_dict_backbone"]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    # DistributedDataParallel's wrapper prefixes every key with "module.".
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def load_model_file(path: str) -> tuple[keras.Model, Architecture]:
    """The Keras backbone of an arcface_torch .pt/.pth file (either layout)."""
    from mvcom_tf.models import torch_checkpoint

    return load_backbone(backbone_state_dict(torch_checkpoint.load(path), path), path)
