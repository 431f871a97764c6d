"""Synthetic long-tailed faces with ground-truth variation labels: the embedded default data.

Every face is rendered from an identity's parameters (outline, hair, eyes, brows, nose,
mouth, tone, freckle texture) plus the variations it is labelled with: yaw (a 2-D
approximation of head rotation: features shift by their depth, foreshorten and the far side
darkens and disappears), one of the occluders of METHOD.md, and Gaussian blur. Identity
lives in several cues, so each variation removes part of the evidence; the four groups
("ethnicity") differ in which cues vary most between their identities, so a network that
saw mostly one group separates that group's identities best.

Everything is a pure function of (seed, split, identity, image index): the same seed gives
the same bytes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.data.augmentation import BLUR_SIGMA_AT_64
from mvcom_tf.data.tfrecord import DatasetError, DatasetInfo, SplitWriter, read_info
from mvcom_tf.files import write_text

SPLITS = ("train", "meta", "test", "val")
# Splits draw identities from disjoint ranges of the global identity index.
_SPLIT_OFFSET = {"train": 0, "meta": 10_000_000, "test": 20_000_000, "val": 30_000_000}
_SPLIT_CODE = {"train": 1, "meta": 2, "test": 3, "val": 4}
# Splits scored by verification pairs (`val` is the bias study's split for choosing settings).
PAIR_SPLITS = ("test", "val")
PAIRS_FILE = "pairs.csv"

# Cue families and how much each varies between identities of each group (rows: the groups
# of schema.CLASS_NAMES["ethnicity"]). The head group (Caucasian) varies most in geometry.
CUES = ("outline", "hair", "eyes", "brows", "nose", "mouth", "tone", "texture")
GROUP_CUE_SPREAD = np.array([
    # outline hair  eyes brows nose mouth tone texture
    [0.6, 1.0, 0.6, 0.6, 1.0, 0.6, 1.0, 1.3],   # African
    [1.3, 0.6, 0.6, 1.3, 0.6, 1.3, 0.6, 0.8],   # Asian
    [0.7, 0.7, 1.4, 0.7, 1.4, 1.2, 0.6, 0.6],   # Caucasian
    [0.6, 1.1, 0.6, 1.2, 0.6, 0.6, 0.8, 1.3],   # Indian
])
GROUP_SKIN = np.array([[105, 70, 50], [215, 180, 145], [225, 185, 160], [170, 120, 85]], np.float64)
# Yaw ranges (degrees) sampled for each pose class.
POSE_YAW_RANGE = ((-80, -60), (-60, -35), (-35, -15), (-15, 15), (15, 35), (35, 60), (60, 80))
NUM_FRECKLES = 7


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How many identities and images a split has, and the distribution of its factors."""

    num_identities: int
    image_size: int = 32
    seed: int = 0
    # train: images per identity fall with the identity's rank as in Zipf's law:
    # min_images + (max_images - min_images) * rank ** -zipf_exponent.
    max_images: int = 80
    min_images: int = 5
    zipf_exponent: float = 0.5
    ethnicity_share: tuple[float, ...] = (0.1, 0.1, 0.7, 0.1)
    pose_probs: tuple[float, ...] = (0.02, 0.04, 0.12, 0.64, 0.12, 0.04, 0.02)
    occlusion_probs: tuple[float, ...] = (0.8, 0.05, 0.05, 0.05, 0.05)
    blur_probs: tuple[float, ...] = (0.7, 0.15, 0.1, 0.05)
    # meta: images per identity, every factor uniform.
    meta_images: int = 10
    # test, val: clean anchor images per identity; each probe image is paired with every anchor
    # (a positive) and with the same anchor index of another identity of the group (a negative).
    pair_anchors: int = 1
    # How the variations are drawn (every split of a data set uses the same): the demo's remove
    # identity evidence; the headroom data's (headroom_config) keep it.
    occluder_opacity: float = 1.0
    far_side_fades: bool = True
    blur_scale: float = 1.0

    @property
    def style(self) -> "Style":
        return Style(self.occluder_opacity, self.far_side_fades, self.blur_scale)


@dataclasses.dataclass(frozen=True)
class Style:
    """How a variation alters a face: an occluder's opacity (1: hides what is under it), whether the side
    of a turned head fades out (True: large yaw hides half the face), and a factor on the blur sigmas."""

    occluder_opacity: float = 1.0
    far_side_fades: bool = True
    blur_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Identity:
    """The rendering parameters of one synthetic person."""

    group: int
    params: dict


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def make_identity(seed: int, global_id: int, group: int) -> Identity:
    """Draws an identity's face parameters from its group's distribution."""
    rng = _rng(seed, 7, global_id)
    spread = dict(zip(CUES, GROUP_CUE_SPREAD[group]))

    def draw(mean: float, sd: float, cue: str, low: float, high: float) -> float:
        return float(np.clip(mean + sd * spread[cue] * rng.standard_normal(), low, high))

    # Tone varies mostly in lightness, a little in hue; hair from black to blond.
    skin = (GROUP_SKIN[group] * (1.0 + 0.09 * spread["tone"] * rng.standard_normal())
            + 8.0 * spread["tone"] * rng.standard_normal(3))
    hair_lightness = float(np.clip(0.2 + 0.18 * spread["hair"] * rng.standard_normal(), 0.0, 1.0))
    params = {
        "face_w": draw(0.62, 0.06, "outline", 0.48, 0.78),
        "face_h": draw(0.80, 0.06, "outline", 0.66, 0.94),
        "jaw": draw(0.0, 0.12, "outline", -0.3, 0.3),
        "hair_line": draw(-0.52, 0.09, "hair", -0.75, -0.3),
        "hair_color": np.clip([25, 20, 15] + hair_lightness * np.array([190, 150, 90]), 0, 255),
        "hair_side": draw(0.0, 0.25, "hair", -0.5, 0.5),
        "eye_x": draw(0.27, 0.045, "eyes", 0.17, 0.38),
        "eye_y": draw(-0.10, 0.05, "eyes", -0.22, 0.02),
        "eye_w": draw(0.10, 0.025, "eyes", 0.05, 0.16),
        "eye_h": draw(0.05, 0.015, "eyes", 0.025, 0.09),
        "iris": np.clip(np.array([70, 50, 40]) + np.array([40, 40, 60]) * rng.random() * spread["eyes"], 0, 255),
        "brow_gap": draw(0.11, 0.035, "brows", 0.05, 0.2),
        "brow_tilt": draw(0.0, 0.18, "brows", -0.45, 0.45),
        "brow_thick": draw(0.025, 0.01, "brows", 0.01, 0.05),
        "brow_len": draw(0.13, 0.03, "brows", 0.07, 0.2),
        "nose_len": draw(0.24, 0.06, "nose", 0.12, 0.36),
        "nose_w": draw(0.07, 0.025, "nose", 0.035, 0.13),
        "mouth_y": draw(0.40, 0.05, "mouth", 0.28, 0.52),
        "mouth_w": draw(0.19, 0.05, "mouth", 0.1, 0.3),
        "mouth_h": draw(0.04, 0.015, "mouth", 0.02, 0.08),
        "lip": np.clip(skin * [0.75, 0.5, 0.5] + 30.0 * spread["mouth"] * rng.standard_normal(3), 0, 255),
        "skin": np.clip(skin, 0, 255),
        "freckle_xy": rng.uniform([-0.45, -0.35], [0.45, 0.55], size=(NUM_FRECKLES, 2)),
        "freckle_size": 0.018 + 0.02 * spread["texture"] * rng.random(NUM_FRECKLES),
        "freckle_dark": 0.25 + 0.35 * min(spread["texture"], 1.2) * rng.random(NUM_FRECKLES),
    }
    return Identity(group=group, params=params)


class _Canvas:
    """Soft-edged shapes composited on a float RGB image over [-1, 1]^2."""

    def __init__(self, size: int, background: np.ndarray) -> None:
        coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
        self.x, self.y = np.meshgrid(coords, coords)
        self.image = np.broadcast_to(background, (size, size, 3)).astype(np.float64).copy()
        self.edge = size / 2.0  # soft edge of about one pixel

    def ellipse(self, cx, cy, ax, ay, angle=0.0) -> np.ndarray:
        dx, dy = self.x - cx, self.y - cy
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        radius = np.sqrt((dx / max(ax, 1e-3)) ** 2 + (dy / max(ay, 1e-3)) ** 2)
        return np.clip((1.0 - radius) * self.edge * min(ax, ay) + 0.5, 0.0, 1.0)

    def paint(self, alpha: np.ndarray, color, opacity: float = 1.0) -> None:
        alpha = (alpha * opacity)[..., None]
        self.image = self.image * (1.0 - alpha) + np.asarray(color, np.float64) * alpha

    def shade(self, alpha: np.ndarray, factor) -> None:
        self.image = self.image * (1.0 - alpha[..., None] * (1.0 - np.asarray(factor)))


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    radius = int(math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(w * padded[:, i:i + image.shape[1]] for i, w in enumerate(taps))
    return sum(w * rows[i:i + image.shape[0]] for i, w in enumerate(taps))


def render_face(identity: Identity, yaw: float, occlusion: int, blur: int, size: int,
                rng: np.random.Generator, style: Style = Style()) -> np.ndarray:
    """Renders one face as uint8 [size, size, 3]."""
    return render_face_with_landmarks(identity, yaw, occlusion, blur, size, rng, style)[0]


def render_face_with_landmarks(identity: Identity, yaw: float, occlusion: int, blur: int, size: int,
                               rng: np.random.Generator, style: Style = Style()) -> tuple[np.ndarray, np.ndarray]:
    """Renders one face, and where its 5 landmarks were drawn: [5, 2] pixel (x, y) of the image-left and
    image-right eye centres, the nose tip, the image-left and image-right mouth corners (ArcFace's order)."""
    p = identity.params
    theta = math.radians(yaw)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    # Per-image nuisance: framing, light, expression.
    shift = rng.normal(0.0, 0.035, 2)
    zoom = 1.0 + rng.normal(0.0, 0.04)
    light = 1.0 + rng.normal(0.0, 0.08)
    smile = rng.normal(0.0, 0.2)
    background = np.clip(rng.uniform(60, 200) + rng.normal(0, 15, 3), 0, 255)
    canvas = _Canvas(size, background)

    def at(x: float, y: float, depth: float) -> tuple[float, float]:
        # Rotation about the vertical axis, projected: points in front of the axis move more.
        return (shift[0] + zoom * (x * cos_t + depth * 0.75 * sin_t), shift[1] + zoom * y)

    def far_side_visibility(x: float) -> float:
        # A feature on the side turning away fades out as the yaw grows past about 45 degrees.
        if x * sin_t >= 0 or not style.far_side_fades:
            return 1.0
        return float(np.clip((cos_t - 0.45) / 0.35, 0.0, 1.0))

    face_w = p["face_w"] * zoom * (0.78 + 0.22 * cos_t)
    face_x, face_y = at(0.0, 0.05, 0.25)
    # Hair behind and above the face.
    canvas.paint(canvas.ellipse(face_x, face_y - 0.1 * zoom, face_w * 1.1, p["face_h"] * zoom * 0.98), p["hair_color"])
    face = canvas.ellipse(face_x, face_y, face_w, p["face_h"] * zoom, angle=p["jaw"] * 0.3)
    canvas.paint(face, np.clip(p["skin"] * light, 0, 255))
    hair_cut = canvas.ellipse(face_x + p["hair_side"] * 0.3 * zoom, face_y + p["hair_line"] * zoom - 0.35 * zoom,
                              face_w * 1.05, 0.45 * zoom)
    canvas.paint(hair_cut * face, p["hair_color"])
    # Freckles: fine texture that blur removes.
    for (fx, fy), radius, dark in zip(p["freckle_xy"], p["freckle_size"], p["freckle_dark"]):
        x, y = at(fx * p["face_w"], fy * p["face_h"] * 0.8, 0.6)
        visible = far_side_visibility(fx)
        if visible > 0:
            canvas.shade(canvas.ellipse(x, y, radius * zoom * max(cos_t, 0.3), radius * zoom) * face,
                         1.0 - dark * visible)
    for side in (-1.0, 1.0):
        visible = far_side_visibility(side)
        if visible <= 0:
            continue
        ex, ey = at(side * p["eye_x"], p["eye_y"], 0.6)
        ew, eh = p["eye_w"] * zoom * max(cos_t, 0.2), p["eye_h"] * zoom
        canvas.paint(canvas.ellipse(ex, ey, ew, eh), (235, 235, 230), visible)
        canvas.paint(canvas.ellipse(ex + 0.3 * ew * sin_t, ey, eh * 0.9, eh * 0.9), p["iris"], visible)
        bx, by = at(side * p["eye_x"], p["eye_y"] - p["brow_gap"], 0.65)
        canvas.paint(canvas.ellipse(bx, by, p["brow_len"] * zoom * max(cos_t, 0.2), p["brow_thick"] * zoom,
                                    angle=side * p["brow_tilt"]), p["hair_color"] * 0.8, visible)
    nx, ny = at(0.0, p["eye_y"] + 0.05 + p["nose_len"] / 2, 1.0)
    canvas.shade(canvas.ellipse(nx, ny, p["nose_w"] * zoom, p["nose_len"] / 2 * zoom), 0.72)
    tip_x, tip_y = at(0.0, p["eye_y"] + 0.05 + p["nose_len"], 1.1)
    canvas.shade(canvas.ellipse(tip_x, tip_y, p["nose_w"] * 1.3 * zoom, p["nose_w"] * 0.6 * zoom), 0.6)
    mx, my = at(0.0, p["mouth_y"], 0.7)
    canvas.paint(canvas.ellipse(mx, my, p["mouth_w"] * zoom * (0.5 + 0.5 * cos_t), p["mouth_h"] * zoom * (1 + smile),
                                angle=0.0), p["lip"])
    # The side turning away is in shadow.
    if abs(sin_t) > 0.05:
        away = np.clip(-np.sign(sin_t) * (canvas.x - face_x) / face_w, 0.0, 1.0)
        canvas.shade(away * face, 1.0 - 0.45 * abs(sin_t))

    _occlude(canvas, occlusion, p, at, face_w, rng, style.occluder_opacity)
    image = _gaussian_blur(canvas.image, style.blur_scale * BLUR_SIGMA_AT_64[blur] * size / 64.0)
    image = image + rng.normal(0.0, 3.0, image.shape)
    mouth_half = p["mouth_w"] * zoom * (0.5 + 0.5 * cos_t)
    points = np.array([at(-p["eye_x"], p["eye_y"], 0.6), at(p["eye_x"], p["eye_y"], 0.6), (tip_x, tip_y),
                       (mx - mouth_half, my), (mx + mouth_half, my)])
    # Canvas coordinates: pixel i's centre is at (i + 0.5) / size * 2 - 1.
    return np.clip(np.round(image), 0, 255).astype(np.uint8), (points + 1.0) / 2.0 * size - 0.5


def _occlude(canvas: _Canvas, occlusion: int, p: dict, at, face_w: float, rng: np.random.Generator,
             opacity: float) -> None:
    if occlusion == 0:
        return
    if occlusion == 1:  # eyes band (sunglasses)
        x, y = at(0.0, p["eye_y"], 0.6)
        band = ((np.abs(canvas.y - y) < 0.11) & (np.abs(canvas.x - x) < face_w * 1.05)).astype(float)
        canvas.paint(band, rng.uniform(10, 50, 3), opacity)
    elif occlusion == 2:  # lower face (mask)
        x, y = at(0.0, 0.42, 0.7)
        mask = canvas.ellipse(x, y, face_w * 1.02, 0.36) * (canvas.y > p["eye_y"] + 0.14)
        canvas.paint(mask, rng.uniform([150, 170, 190], [230, 240, 255]), opacity)
    elif occlusion == 3:  # left or right half
        side = 1.0 if rng.random() < 0.5 else -1.0
        x, _ = at(0.0, 0.0, 0.8)
        half = ((canvas.x - x) * side > -0.02).astype(float) * (np.abs(canvas.y) < 0.95)
        canvas.paint(half, rng.uniform(40, 200, 3), opacity)
    elif occlusion == 4:  # random object patch
        w, h = rng.uniform(0.3, 0.5, 2)
        x, y = rng.uniform(-0.35, 0.35), rng.uniform(-0.35, 0.45)
        patch = ((np.abs(canvas.x - x) < w / 2) & (np.abs(canvas.y - y) < h / 2)).astype(float)
        canvas.paint(patch, rng.uniform(0, 255, 3), opacity)


def encode_png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


# ----------------------------------------------------------------------------- splits


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One image to render: who, and with which variations."""

    local_id: int
    global_id: int
    group: int
    index: int
    pose: int
    occlusion: int
    blur: int


def _train_plan(config: SplitConfig) -> list[_Planned]:
    rng = _rng(config.seed, _SPLIT_CODE["train"])
    n = config.num_identities
    groups = rng.choice(4, size=n, p=np.asarray(config.ethnicity_share) / sum(config.ethnicity_share))
    ranks = rng.permutation(n) + 1
    counts = np.round(config.min_images + (config.max_images - config.min_images)
                      * ranks ** -config.zipf_exponent).astype(int)
    plan = []
    for local_id in range(n):
        for index in range(counts[local_id]):
            plan.append(_Planned(local_id, _SPLIT_OFFSET["train"] + local_id, int(groups[local_id]), index,
                                 int(rng.choice(7, p=config.pose_probs)),
                                 int(rng.choice(5, p=config.occlusion_probs)),
                                 int(rng.choice(4, p=config.blur_probs))))
    return plan


def _meta_plan(config: SplitConfig) -> list[_Planned]:
    rng = _rng(config.seed, _SPLIT_CODE["meta"])
    plan = []
    for local_id in range(config.num_identities):
        for index in range(config.meta_images):
            plan.append(_Planned(local_id, _SPLIT_OFFSET["meta"] + local_id, local_id % 4, index,
                                 int(rng.integers(7)), int(rng.integers(5)), int(rng.integers(4))))
    return plan


# Each factor's class that the synthetic training data makes most frequent, as web-crawled data does (its "head"
# class: frontal, unoccluded, sharp, Caucasian); pair splits render their clean anchors and probes with it.
HEAD_CLASS = {"pose": 3, "occlusion": 0, "blur": 0, "ethnicity": 2}
CLEAN = (HEAD_CLASS["pose"], HEAD_CLASS["occlusion"], HEAD_CLASS["blur"])  # (pose, occlusion, blur)


def _probe_variations() -> list[tuple[int, int, int]]:
    """(pose, occlusion, blur) of the probe images: one clean, then one per non-head class of each factor."""
    frontal = HEAD_CLASS["pose"]
    variations = [CLEAN]
    variations += [(pose, 0, 0) for pose in range(7) if pose != frontal]
    variations += [(frontal, occlusion, 0) for occlusion in range(1, 5)]
    variations += [(frontal, 0, blur) for blur in range(1, 4)]
    return variations


def images_per_identity(config: SplitConfig) -> int:
    """Images of each identity of a pair split: the clean anchors, then the probes."""
    return config.pair_anchors + len(_probe_variations())


def _pair_plan(config: SplitConfig, split: str) -> list[_Planned]:
    """Per identity: `pair_anchors` clean images, then the probes of `_probe_variations`."""
    plan = []
    variations = [CLEAN] * config.pair_anchors + _probe_variations()
    for local_id in range(config.num_identities):
        for index, (pose, occlusion, blur) in enumerate(variations):
            plan.append(_Planned(local_id, _SPLIT_OFFSET[split] + local_id, local_id % 4, index,
                                 pose, occlusion, blur))
    return plan


def _pair_labels(pose: int, occlusion: int, blur: int, group: int) -> dict[str, int]:
    """The groups a pair counts for: the factor its probe varies (every factor's head class for a clean probe)."""
    labels = {"pose": -1, "occlusion": -1, "blur": -1, "ethnicity": group}
    if (pose, occlusion, blur) == CLEAN:
        labels.update(pose=pose, occlusion=occlusion, blur=blur)
    elif pose != HEAD_CLASS["pose"]:
        labels["pose"] = pose
    elif occlusion:
        labels["occlusion"] = occlusion
    else:
        labels["blur"] = blur
    return labels


def _verification_pairs(config: SplitConfig, split: str = "test") -> list[tuple[int, int, int, dict[str, int]]]:
    """Verification pairs balanced within every group of every factor.

    Image A is always a clean anchor; image B, the probe, carries at most one variation. The
    pair counts for the factor it varies (and for the head class of every factor when B is
    clean), and for the ethnicity group of its identities: negatives pair identities of the
    same group, as RFW does, a different impostor for each anchor.
    """
    n, anchors = config.num_identities, config.pair_anchors
    if n < 4 * (anchors + 1):
        raise ValueError(f"a pair split with {anchors} anchor(s) needs at least {4 * (anchors + 1)} identities "
                         f"({anchors + 1} per group), got {n}")
    k = images_per_identity(config)
    pairs = []
    for identity in range(n):
        group = identity % 4
        for offset, variation in enumerate(_probe_variations()):
            probe = anchors + offset
            labels = _pair_labels(*variation, group)
            for anchor in range(anchors):
                impostor = (identity + 4 * (anchor + 1)) % n  # the same group: groups are identity % 4
                pairs.append((identity * k + anchor, identity * k + probe, 1, labels))
                pairs.append((identity * k + anchor, impostor * k + probe, 0, labels))
    order = _rng(config.seed, _SPLIT_CODE[split], 99).permutation(len(pairs))
    return [pairs[i] for i in order]


def _plan(split: str, config: SplitConfig) -> list[_Planned]:
    if split in PAIR_SPLITS:
        return _pair_plan(config, split)
    return {"train": _train_plan, "meta": _meta_plan}[split](config)


def _render(split: str, config: SplitConfig, planned: _Planned, identities: dict) -> schema.FaceRecord:
    if planned.global_id not in identities:
        identities[planned.global_id] = make_identity(config.seed, planned.global_id, planned.group)
    rng = _rng(config.seed, _SPLIT_CODE[split], planned.global_id, planned.index)
    low, high = POSE_YAW_RANGE[planned.pose]
    yaw = float(rng.uniform(low, high)) if planned.pose != 3 else float(rng.uniform(-12, 12))
    image = render_face(identities[planned.global_id], yaw, planned.occlusion, planned.blur,
                        config.image_size, rng, config.style)
    return schema.FaceRecord(
        image=encode_png(image), identity=planned.local_id, pose=planned.pose,
        occlusion=planned.occlusion, blur=planned.blur, ethnicity=planned.group,
        yaw=float(np.float32(yaw)),
        source=f"synthetic:seed{config.seed}:{split}:id{planned.global_id:08d}:img{planned.index:03d}")


def write_split(out_dir: str, split: str, config: SplitConfig, num_shards: int = 4,
                progress=None) -> DatasetInfo:
    """Renders a split into a dataset folder (shards, dataset.json, and pairs.csv for `test`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    plan = _plan(split, config)
    writer = SplitWriter(out_dir, split, num_shards, config.image_size)
    identities: dict[int, Identity] = {}
    bounds = np.linspace(0, len(plan), num_shards + 1).astype(int)
    done = 0
    for shard in range(num_shards):
        def records(start=bounds[shard], stop=bounds[shard + 1]):
            nonlocal done
            for planned in plan[start:stop]:
                yield _render(split, config, planned, identities)
                done += 1
                if progress:
                    progress(done, len(plan))
        writer.write_shard(shard, records())
    extras = {}
    if split in PAIR_SPLITS:
        extras["pairs"] = PAIRS_FILE
        _write_pairs(f"{out_dir}/{PAIRS_FILE}", _verification_pairs(config, split))
    made_by = {"tool": "mvcom_tf.data.synthetic", "config": dataclasses.asdict(config), "split": split}
    return writer.finish(made_by, extras)


def _write_pairs(path: str, pairs) -> None:
    lines = ["index_a,index_b,same," + ",".join(schema.FACTORS)]
    lines += [f"{a},{b},{same}," + ",".join(str(labels[f]) for f in schema.FACTORS) for a, b, same, labels in pairs]
    write_text(path, "\n".join(lines) + "\n")


def demo_configs(image_size: int = 32, seed: int = 0) -> dict[str, SplitConfig]:
    """The splits of the CPU demo: long-tailed train, balanced meta, pair-balanced test."""
    return {
        "train": SplitConfig(num_identities=500, image_size=image_size, seed=seed),
        "meta": SplitConfig(num_identities=80, image_size=image_size, seed=seed),
        "test": SplitConfig(num_identities=160, image_size=image_size, seed=seed),
    }


# The headroom data (benchmarks/bias.py --data=headroom): every tail class of pose, occlusion and blur
# at a small fraction of the training images (0.25% by default), and variations that keep the identity
# evidence, so that what hurts the tail is its rarity, not lost information (METHOD.md, "Headroom").
# Chosen on val by the headroom search: docs/bias_study.md.
HEADROOM_TAIL_FRACTION = 0.0025
HEADROOM_STYLE = dict(occluder_opacity=0.5, far_side_fades=False, blur_scale=0.5)


def headroom_train_probs(tail_fraction: float = HEADROOM_TAIL_FRACTION) -> dict[str, tuple[float, ...]]:
    """The training split's class probabilities: each tail class at `tail_fraction`, the rest frontal, unoccluded, sharp."""
    def probs(num_classes: int, head: int) -> tuple[float, ...]:
        values = [tail_fraction] * num_classes
        values[head] = round(1.0 - tail_fraction * (num_classes - 1), 10)
        if values[head] <= 0:
            raise ValueError(f"tail_fraction {tail_fraction} leaves no head class among {num_classes} classes")
        return tuple(values)

    return dict(pose_probs=probs(7, 3), occlusion_probs=probs(5, 0), blur_probs=probs(4, 0))


def headroom_config(config: SplitConfig, split: str, tail_fraction: float = HEADROOM_TAIL_FRACTION) -> SplitConfig:
    """A split of the headroom data: the identity-keeping style (every split) and the rare tails (train)."""
    rare = headroom_train_probs(tail_fraction) if split == "train" else {}
    return dataclasses.replace(config, **HEADROOM_STYLE, **rare)


def write_demo_data(root: str, image_size: int = 32, seed: int = 0) -> dict[str, DatasetInfo]:
    """Writes <root>/{train,meta,test} for the demo; a split whose dataset.json exists is kept as it is."""
    infos = {}
    for split, config in demo_configs(image_size, seed).items():
        try:
            infos[split] = read_info(f"{root}/{split}")
        except DatasetError:
            infos[split] = write_split(f"{root}/{split}", split, config)
    return infos
