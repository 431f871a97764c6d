"""Real faces: public in-the-wild photos no one here made, trained on from scratch and verified on unseen people.

    python -m benchmarks.real_faces --celeba=<checkout of github:matush97/faceRecognition> [--seeds=0,1,2]
    python -m benchmarks.real_faces --celeba=<folder> --quick    # tiny network and schedule (the tests)

The folder holds `Celeb/` (6,300 CelebA photos of 299 identities) and `identity_CelebA.txt` (`<image>
<identity>` per line, a header line first); docs/real_faces.md says how to get it. Nothing of it is
committed. The benchmark:
1. splits the identities (fixed seed) into 200 for training and the rest for testing, and converts
   each split with the project's detection (MTCNN landmarks, ArcFace alignment at 64 px, pose
   measured from the landmarks and blur from the Laplacian: tools/convert_folder.py's path);
2. writes the test split's pairs: every same-identity pair and as many different-identity pairs
   drawn with a fixed seed, shuffled (the 10-fold folds are taken in file order); a pair's group
   for pose and blur is the rarer class of its two photos;
3. per seed, a run of flags/real_faces.cfg: CosFace from scratch (--stage=pretrain, with
   --fused_bn, without the recipe's flags), then from its checkpoint a CosFace fine-tuning and a
   fine-tuning with --recipe (the bias study's recommendation), same length and batches
   (--stage=finetune,meta); finished runs are not trained again;
4. scores raw pixels on the same pairs (mean-removed, L2-normalised 64 px faces) as the floor;
5. prints a table and, last, the JSON; the full run also writes benchmarks/results/real_faces.json.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks.training_run import REPO, stop_trainings_with_this_process, train_run
from mvcom_tf.data import schema

RESULTS = os.path.join(REPO, "benchmarks", "results", "real_faces.json")
# The bias study's recommendation (docs/bias_study.md), as flags of the meta stage.
RECIPE = ("--train_sampling=balanced", "--margin_prior=constant", "--meta_lr_tau=0")
# A quarter width, not an eighth: at 64 px an eighth-width IResNet-18 aborts the process in TensorFlow 2.21's oneDNN
# kernels ("free(): invalid next size"; it runs with TF_ENABLE_ONEDNN_OPTS=0), at 32 px it runs.
QUICK_FLAGS = ("--width_multiplier=0.25", "--embedding_size=32", "--batch_size=16", "--epochs=2", "--lr_steps=1",
               "--meta_epochs=1", "--log_every=10", "--variation_warmup_steps=2")
# The pre-training's own: --fused_bn is a faster pretrain step (docs/benchmarks.md) that the meta stage refuses.
PRETRAIN_FLAGS = ("--fused_bn",)
GROUP_FACTORS = ("pose", "blur")  # what detection measures on photos (occlusion and ethnicity stay unknown)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("celeba", None, "Folder with Celeb/ and identity_CelebA.txt.", required=True)
    flags.DEFINE_string("out_dir", "runs/real_faces", "Where the converted splits and the runs go.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of the paired runs.")
    flags.DEFINE_integer("train_identities", 200, "Identities trained on; the others are the unseen test people.",
                         lower_bound=2)
    flags.DEFINE_integer("split_seed", 0, "Seed of the identity split and of the different-identity pairs.")
    flags.DEFINE_list("recipe", list(RECIPE), "Flags of the fine-tuning compared with the CosFace fine-tuning.")
    flags.DEFINE_integer("min_group_pairs", 100, "Groups with fewer test pairs are left out of the table.",
                         lower_bound=1)
    flags.DEFINE_float("min_confidence", 0.9, "The lowest MTCNN confidence a photo's face is kept at.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_bool("quick", False, "A tiny network and schedule (the tests).")


def read_identities(root: str) -> dict[str, list[str]]:
    """identity -> its photos in Celeb/ (sorted), from identity_CelebA.txt; photos absent from Celeb/ are left out."""
    listing = os.path.join(root, "identity_CelebA.txt")
    photos = os.path.join(root, "Celeb")
    if not os.path.isfile(listing) or not os.path.isdir(photos):
        raise app.UsageError(f"--celeba={root} needs Celeb/ and identity_CelebA.txt (docs/real_faces.md)")
    present = set(os.listdir(photos))
    people: dict[str, list[str]] = {}
    with open(listing) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                if number == 1:
                    continue  # the header: "image identity"
                raise app.UsageError(f"{listing}, line {number}: expected '<image> <identity>', got {line.strip()!r}")
            if fields[0] in present:
                people.setdefault(fields[1], []).append(fields[0])
    return {identity: sorted(names) for identity, names in sorted(people.items(), key=lambda kv: int(kv[0]))}


def stage_split(root: str, people: dict[str, list[str]], identities: list[str], folder: str) -> None:
    """<folder>/<identity>/<photo> as links to Celeb/ (the converters' layout; no photo is copied)."""
    for identity in identities:
        os.makedirs(os.path.join(folder, identity), exist_ok=True)
        for name in people[identity]:
            link = os.path.join(folder, identity, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(root, "Celeb", name)), link)


def convert_split(photos: str, out_dir: str, split: str, image_size: int, min_confidence: float) -> dict:
    """The project's conversion with detection (resumable); returns its report's counts."""
    from mvcom_tf.data import conversion, sources

    source = sources.FolderSource(photos, align="detect", image_size=image_size, min_confidence=min_confidence)
    info, report = conversion.convert(source, out_dir, split=split, num_shards=1, progress=True,
                                      tool="benchmarks/real_faces.py")
    return {"images": info.num_images, "identities": info.num_identities, "skipped": report.to_json()}


def pair_groups(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """A pair's group in one factor: the rarer class (fewer test photos) of its two photos; unknown if either is."""
    first, second = labels[:, 0], labels[:, 1]
    rarer = np.where(counts[np.maximum(first, 0)] <= counts[np.maximum(second, 0)], first, second)
    return np.where((first < 0) | (second < 0), -1, rarer)


def write_pairs(test_dir: str, seed: int) -> dict:
    """Every same-identity pair of the test split and as many different-identity pairs (fixed seed), as the
    pair-split format (pairs.csv, named in dataset.json) that `--eval_data` scores per group."""
    from mvcom_tf.data.tfrecord import iterate_records, read_info
    from mvcom_tf.files import write_json

    records = list(iterate_records(test_dir))
    identities = np.array([r.identity for r in records])
    same = [(a, b) for a in range(len(records)) for b in range(a + 1, len(records)) if identities[a] == identities[b]]
    rng = np.random.default_rng(seed)
    different: set[tuple[int, int]] = set()
    while len(different) < len(same):
        a, b = sorted(rng.choice(len(records), 2, replace=False).tolist())
        if identities[a] != identities[b]:
            different.add((a, b))
    # Shuffled: the 10-fold protocol takes its folds in file order (insightface's), so each fold must hold both kinds.
    order = rng.permutation(len(same) + len(different))
    pairs = np.array(same + sorted(different))[order]
    is_same = np.r_[np.ones(len(same), int), np.zeros(len(different), int)][order]
    columns = []
    for factor in schema.FACTORS:
        labels = np.array([getattr(r, factor) for r in records])
        counts = np.bincount(labels[labels >= 0], minlength=schema.NUM_CLASSES[factor])
        columns.append(pair_groups(labels[pairs], counts))
    with open(os.path.join(test_dir, "pairs.csv"), "w") as f:
        f.write("index_a,index_b,same," + ",".join(schema.FACTORS) + "\n")
        for (a, b), s, *groups in zip(pairs, is_same, *columns):
            f.write(f"{a},{b},{s}," + ",".join(str(g) for g in groups) + "\n")
    info = read_info(test_dir)
    write_json(os.path.join(test_dir, "dataset.json"), {**info.to_json(), "extras": {**info.extras, "pairs": "pairs.csv"}})
    return {"same": len(same), "different": len(different)}


def raw_pixels(test_dir: str) -> dict:
    """The floor: each aligned face's pixels, mean removed and L2-normalised, as its embedding; 10-fold accuracy."""
    from mvcom_tf.data.pipeline import eval_dataset
    from mvcom_tf.data.tfrecord import read_info
    from mvcom_tf.evaluation.verification import kfold_accuracy, read_pairs

    info = read_info(test_dir)
    images = np.concatenate([batch["image"].numpy() for batch in eval_dataset(test_dir, info, 256, info.image_size)])
    vectors = images.reshape(len(images), -1).astype(np.float64)
    vectors -= vectors.mean(axis=1, keepdims=True)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = read_pairs(os.path.join(test_dir, "pairs.csv"))
    scores = np.sum(vectors[pairs["index_a"]] * vectors[pairs["index_b"]], axis=1)
    return {"accuracy": kfold_accuracy(scores, pairs["same"].astype(bool)).accuracy}


def train(out_dir: str, seed: str, data: dict[str, str]) -> dict:
    """One seed: the pre-training (plain CosFace: the recipe's flags stay out of it), then from its checkpoint the
    CosFace fine-tuning and the recipe's; their metrics.json merged, each run once."""
    common = ["--flagfile=flags/real_faces.cfg", *(QUICK_FLAGS if FLAGS.quick else ()), f"--train_data={data['train']}",
              f"--eval_data=synthetic:{data['test']}", f"--seed={seed}"]
    pretrain = os.path.join(out_dir, f"seed{seed}", "pretrain")
    fine_tuning = os.path.join(out_dir, f"seed{seed}", "fine_tuning")
    runs = ((pretrain, ["--stage=pretrain", *PRETRAIN_FLAGS]),
            (fine_tuning, [f"--meta_data={data['train']}", "--stage=finetune,meta",
                           f"--init_checkpoint={pretrain}/checkpoints/pretrain", *FLAGS.recipe]))
    stages, minutes = {}, {}
    for folder, flags_of_run in runs:
        metrics = os.path.join(folder, "metrics.json")
        if not os.path.exists(metrics):
            print(f"training seed {seed}: {os.path.basename(folder)}", file=sys.stderr, flush=True)
            seconds = train_run([*common, *flags_of_run], folder)
            if not os.path.exists(os.path.join(folder, "minutes.txt")):  # a finished run re-run only re-evaluates
                with open(os.path.join(folder, "minutes.txt"), "w") as f:
                    f.write(f"{seconds / 60:.1f}\n")
        with open(metrics) as f:
            stages.update(json.load(f)["stages"])
        with open(os.path.join(folder, "minutes.txt")) as f:
            minutes[os.path.basename(folder)] = float(f.read())
    return {"stages": stages, "minutes": minutes}


def summarise(runs: list[dict], pixels: dict, min_pairs: int) -> dict:
    """Per stage the mean accuracy over seeds, the paired difference recipe - CosFace fine-tuning with its 95% t
    interval, and per group (enough pairs) the same for each group's accuracy at the global threshold."""
    from mvcom_tf.evaluation.metrics import paired_interval

    def stage(run, name):
        return run["stages"][name]

    summary = {"raw_pixels": pixels, "stages": {}}
    for name in ("pretrain", "finetune", "meta"):
        values = [stage(run, name)["accuracy"] for run in runs]
        summary["stages"][name] = {"accuracy": float(np.mean(values)), "per_seed": values}
    mean, low, high = paired_interval([stage(r, "meta")["accuracy"] - stage(r, "finetune")["accuracy"] for r in runs])
    summary["recipe_minus_cosface"] = {"accuracy_diff": mean, "accuracy_ci": [low, high], "groups": {}}
    first = stage(runs[0], "meta")["benchmarks"]
    key = next(iter(first))
    pairs_per_group = runs[0]["pairs_per_group"]
    for factor in GROUP_FACTORS:
        for group, count in pairs_per_group[factor].items():
            if count < min_pairs:
                continue
            diffs = [stage(r, "meta")["benchmarks"][key]["factors"][factor]["global_threshold"][group]
                     - stage(r, "finetune")["benchmarks"][key]["factors"][factor]["global_threshold"][group]
                     for r in runs]
            mean, low, high = paired_interval(diffs)
            summary["recipe_minus_cosface"]["groups"][f"{factor}/{group}"] = {
                "pairs": count, "diff": mean, "ci": [low, high],
                "cosface": float(np.mean([stage(r, "finetune")["benchmarks"][key]["factors"][factor]
                                          ["global_threshold"][group] for r in runs]))}
    return summary


def group_counts(test_dir: str) -> dict[str, dict[str, int]]:
    """Test pairs per group of each measured factor."""
    from mvcom_tf.evaluation.verification import read_pairs

    pairs = read_pairs(os.path.join(test_dir, "pairs.csv"))
    return {factor: {schema.CLASS_NAMES[factor][c]: int(np.sum(pairs[factor] == c))
                     for c in range(schema.NUM_CLASSES[factor]) if np.any(pairs[factor] == c)}
            for factor in GROUP_FACTORS}


def table(result: dict) -> str:
    """The readable table: accuracies, the paired difference and the groups."""
    diff = result["recipe_minus_cosface"]
    lines = [f"unseen identities: {result['test']['identities']}, pairs {result['pairs']['same']} same + "
             f"{result['pairs']['different']} different; {len(result['seeds'])} seeds",
             f"{'model':<34} {'accuracy':>9}", f"{'raw pixels':<34} {result['raw_pixels']['accuracy']:>9.4f}"]
    for name, label in (("pretrain", "CosFace from scratch"), ("finetune", "+ CosFace fine-tuning"),
                        ("meta", "+ recipe fine-tuning")):
        lines.append(f"{label:<34} {result['stages'][name]['accuracy']:>9.4f}")
    low, high = diff["accuracy_ci"]
    lines.append(f"recipe - CosFace fine-tuning: {diff['accuracy_diff']:+.4f} [{low:+.4f}, {high:+.4f}]")
    for group, figures in diff["groups"].items():
        low, high = figures["ci"]
        lines.append(f"  {group:<22} {figures['pairs']:>6} pairs  CosFace {figures['cosface']:.4f}  "
                     f"{figures['diff']:+.4f} [{low:+.4f}, {high:+.4f}]")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    stop_trainings_with_this_process()
    started = time.perf_counter()
    image_size = 64
    people = read_identities(FLAGS.celeba)
    order = np.random.default_rng(FLAGS.split_seed).permutation(list(people))
    if len(order) <= FLAGS.train_identities:
        raise app.UsageError(f"--train_identities={FLAGS.train_identities} leaves no test identity of {len(order)}")
    splits = {"train": sorted(order[:FLAGS.train_identities], key=int),
              "test": sorted(order[FLAGS.train_identities:], key=int)}
    data, converted = {}, {}
    for split, identities in splits.items():
        photos = os.path.join(FLAGS.out_dir, "photos", split)
        stage_split(FLAGS.celeba, people, identities, photos)
        data[split] = os.path.join(FLAGS.out_dir, "data", split)
        print(f"converting {split} ({len(identities)} identities)", file=sys.stderr, flush=True)
        converted[split] = convert_split(photos, data[split], split, image_size, FLAGS.min_confidence)
    pair_counts = write_pairs(data["test"], FLAGS.split_seed)
    pixels = raw_pixels(data["test"])
    counts = group_counts(data["test"])
    runs = [{**train(FLAGS.out_dir, seed, data), "pairs_per_group": counts} for seed in FLAGS.seeds]
    result = {**summarise(runs, pixels, FLAGS.min_group_pairs), "seeds": [int(s) for s in FLAGS.seeds],
              "train": converted["train"], "test": converted["test"], "pairs": pair_counts,
              "pairs_per_group": counts, "recipe": list(FLAGS.recipe), "pretrain_flags": list(PRETRAIN_FLAGS),
              "run_minutes": {seed: run["minutes"] for seed, run in zip(FLAGS.seeds, runs)}, "quick": FLAGS.quick,
              "minutes": round((time.perf_counter() - started) / 60, 1),  # this invocation's (runs done before: 0)
              "training_minutes": round(sum(sum(run["minutes"].values()) for run in runs), 1),
              "command": "python -m benchmarks.real_faces " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat()}
    if not FLAGS.quick:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            json.dump(result, f, indent=1, default=float)
    print(table(result))
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    define_flags()
    app.run(main)
