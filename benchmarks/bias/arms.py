"""The study's arms: what each trains, as flags of `mvcom_tf.train --stage=meta`, and the knobs chosen on val.

Every arm fine-tunes a seed's CosFace pre-training for the study's length with that seed's batches;
`cosface` (a constant margin, nothing learned) is the baseline each is paired against. An arm named
`resample+<kind>` is <kind> on top of balanced resampling (--train_sampling=balanced).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

from mvcom_tf.data import schema

CONSTANT = ("--margin_prior=constant", "--meta_lr_tau=0")
STACK_PREFIX = "resample+"
# Knobs added after runs were named: in a run's name only away from these values, so those runs keep their names.
LATE_KNOBS = {"pose_weight": 1.0, "power": 1.0}
# The stacked arm of the default list: resolved on val to the best arm that reads no per-sample tail labels.
STACK_BEST = STACK_PREFIX + "best"


@dataclasses.dataclass(frozen=True)
class Arm:
    """One fine-tuning configuration: an arm of the study with its knobs' values."""

    arm: str  # a kind of ARM_KINDS, or resample+<kind>
    length: int
    tau: float = 0.0
    scope: str = "output_block"
    delta: float = 0.0
    step_size: float = 0.0
    upweight: float = 0.0
    mix: float = 1.0
    pose_weight: float = 1.0  # the meta objective's weight of the pose factor (the others' are 1)
    power: float = 1.0  # the learned weights' power (--meta_weight_power)

    @property
    def kind(self) -> str:
        """The arm without its stacking prefix."""
        return self.arm.removeprefix(STACK_PREFIX)

    @property
    def stacked(self) -> bool:
        return self.arm.startswith(STACK_PREFIX)

    @property
    def objective(self) -> str:
        """The meta objective of an MvCoM arm (the last word of its kind)."""
        return self.kind.rsplit("_", 1)[-1]

    @property
    def name(self) -> str:
        """The run folder's name: the arm, its knobs, the scope of MvCoM arms, the length."""
        kind = ARM_KINDS[self.kind]
        parts = [self.arm] + [f"{knob}{getattr(self, knob):g}" for knob in kind.knobs
                              if LATE_KNOBS.get(knob) != getattr(self, knob)]
        if kind.meta:
            parts.append(self.scope)
        return "-".join(parts + [f"e{self.length}"])

    def flags(self, pretrain_dir: str) -> list[str]:
        """The training flags of this arm (`pretrain_dir`: the seed's pre-training, where JTT's error set is)."""
        arm_flags = ARM_KINDS[self.kind].flags(self, pretrain_dir)
        if self.stacked:
            arm_flags = arm_flags + ["--train_sampling=balanced"]
        return arm_flags + [f"--meta_epochs={self.length}"]


@dataclasses.dataclass(frozen=True)
class ArmKind:
    """An arm of the study: its flags, the Arm fields it reads (its knobs, searched on val), whether it reads the
    training images' variation labels (per-sample tail labels), whether it runs the meta step."""

    flags: Callable[[Arm, str], list[str]]
    knobs: tuple[str, ...] = ()
    tail_labels: bool = False
    meta: bool = False
    description: str = ""
    error_set: bool = False  # trains on JTT's error set of the seed's pre-training


def _mvcom(target: str) -> Callable[[Arm, str], list[str]]:
    def flags(arm: Arm, pretrain_dir: str) -> list[str]:
        prior = "constant" if target == "weights" else "volume"
        factor_weights = [arm.pose_weight if factor == "pose" else 1.0 for factor in schema.FACTORS]
        return [f"--margin_prior={prior}", "--meta_sampling=hard", f"--meta_objective={arm.objective}",
                f"--meta_target={target}", f"--meta_lr_tau={arm.tau:g}", f"--meta_weight_mix={arm.mix:g}",
                f"--meta_scope={arm.scope}", "--factor_weights=" + ",".join(f"{w:g}" for w in factor_weights),
                f"--meta_weight_power={arm.power:g}"]
    return flags


def error_set_path(pretrain_dir: str) -> str:
    """Where the study keeps JTT's error set of a seed's pre-training."""
    return f"{pretrain_dir}/error_set.txt"


def _jtt(arm: Arm, pretrain_dir: str) -> list[str]:
    return ["--loss_weighting=error_set", f"--error_set={error_set_path(pretrain_dir)}",
            f"--error_set_upweight={arm.upweight:g}"]


ARM_KINDS: dict[str, ArmKind] = {
    "cosface": ArmKind(lambda arm, _: list(CONSTANT), description="constant margin (the baseline)"),
    "prior": ArmKind(lambda arm, _: ["--margin_prior=volume", "--meta_lr_tau=0"],
                     description="the class-aware margin prior alone"),
    "oracle": ArmKind(lambda arm, _: [*CONSTANT, "--oracle_margin_deltas=" + ",".join([f"{arm.delta:g}"] * len(schema.FACTORS))],
                      knobs=("delta",), tail_labels=True,
                      description="m + delta per factor in which the sample is in a tail class"),
    "oracle_head": ArmKind(lambda arm, _: [*CONSTANT, "--oracle_side=head",
                                           "--oracle_margin_deltas=" + ",".join([f"{arm.delta:g}"] * len(schema.FACTORS))],
                           knobs=("delta",), tail_labels=True,
                           description="m - delta per factor in which the sample is in the head class"),
    "resample": ArmKind(lambda arm, _: [*CONSTANT, "--train_sampling=balanced"], tail_labels=True,
                        description="balanced resampling of the training stream"),
    "loss_weight": ArmKind(lambda arm, _: [*CONSTANT, "--loss_weighting=balanced"], tail_labels=True,
                           description="loss weights with resampling's ratios"),
    "groupdro": ArmKind(lambda arm, _: [*CONSTANT, "--loss_weighting=groupdro", f"--groupdro_step_size={arm.step_size:g}"],
                        knobs=("step_size",), tail_labels=True, description="GroupDRO over each factor's classes"),
    "jtt": ArmKind(lambda arm, pretrain_dir: [*CONSTANT, *_jtt(arm, pretrain_dir)], knobs=("upweight",),
                   error_set=True, description="JTT: the pre-training's errors up-weighted"),
    "mvcom_variation": ArmKind(_mvcom("margins"), knobs=("tau",), meta=True, description="MvCoM, Eq. 13"),
    "mvcom_verification": ArmKind(_mvcom("margins"), knobs=("tau",), meta=True,
                                  description="MvCoM, our verification objective"),
    "mvcom_weights_variation": ArmKind(_mvcom("weights"), knobs=("mix",), meta=True,
                                       description="learned loss weights, Eq. 13's objective"),
    "mvcom_weights_verification": ArmKind(_mvcom("weights"), knobs=("mix",), meta=True,
                                          description="learned loss weights, verification objective"),
    "mvcom_both_verification": ArmKind(_mvcom("both"), knobs=("tau", "mix", "pose_weight", "power"), meta=True,
                                       description="learned margins and loss weights, verification objective"),
    # The two label-free levers together: JTT's weights are the data weights the learned ones redistribute.
    "mvcom_both_jtt_verification": ArmKind(lambda arm, pretrain_dir: _mvcom("both")(arm, pretrain_dir)
                                           + _jtt(arm, pretrain_dir), knobs=("tau", "mix", "upweight"), meta=True,
                                           error_set=True, description="mvcom_both_verification on JTT's weights"),
}
# Every arm but the baseline, in the report's order; `resample+best` last.
ARMS = tuple(kind for kind in ARM_KINDS if kind != "cosface") + (STACK_BEST,)


def is_arm(name: str) -> bool:
    """A name --arms accepts: a kind, resample+<kind> or resample+best."""
    return name == STACK_BEST or name.removeprefix(STACK_PREFIX) in ARM_KINDS


def grid_arms(arm: str, length: int, grid: dict[str, tuple], scope: str) -> list[Arm]:
    """The arm at every combination of its knobs' values in `grid` (one Arm for a kind without knobs)."""
    knobs = ARM_KINDS[arm.removeprefix(STACK_PREFIX)].knobs
    missing = [knob for knob in knobs if knob not in grid]
    if missing:
        raise ValueError(f"the study gives no values for {arm}'s {', '.join(missing)}")
    return [Arm(arm, length, scope=scope, **dict(zip(knobs, values)))
            for values in itertools.product(*(grid[knob] for knob in knobs))]


def labels_read(arm: str) -> str:
    """What an arm reads of the training images beyond identities, for the report."""
    kind = ARM_KINDS[arm.removeprefix(STACK_PREFIX)]
    return "tail labels" if kind.tail_labels or arm.startswith(STACK_PREFIX) else "none"

