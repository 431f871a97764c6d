"""The user's guide: README.md and docs/ link to files that exist, and their commands use flags that exist."""

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import REPO, run_module

PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A command and the flags written after it on its line (continued with a trailing backslash).
COMMAND = re.compile(r"(python -m (?:mvcom_tf|benchmarks)\.\w+|python tools/\w+\.py|mvcom-(?:train|evaluate|embed))"
                     r"(?=\s|$)")
FLAG = re.compile(r"(?<![\w-])--(?:no)?([a-z][a-z0-9_]*)")
ABSL_FLAG = re.compile(r"^\s+--(?:\[no\])?([a-z][a-z0-9_]*)", re.MULTILINE)
# absl's own flags, which --helpfull describes without listing them as flags.
ABSL_BUILTIN = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok"}


def commands_in(text: str) -> list[tuple[str, list[str]]]:
    """(command, flags) for each command in the page's code: blocks and inline code spans."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        matches = list(COMMAND.finditer(line))
        for match, following in zip(matches, matches[1:] + [None]):
            rest = line[match.end():following.start() if following else len(line)]
            rest = re.split(r"[`;|]|\s#|&&", rest)[0]  # up to the end of the code span or the command
            found.append((match.group(1), FLAG.findall(rest)))
    return found


def module_args(command: str) -> list[str]:
    if command.startswith("mvcom-"):
        return ["-m", f"mvcom_tf.{command.removeprefix('mvcom-')}"]
    if command.startswith("python -m "):
        return ["-m", command.removeprefix("python -m ")]
    return [command.removeprefix("python ")]


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(open(page).read()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, REPO)}: {target}")
    assert not broken, broken


def test_every_flag_in_a_documented_command_is_defined_by_it():
    used: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for page in PAGES:
        for command, names in commands_in(open(page).read()):
            used.setdefault(command, set()).update(names)
            for name in names:
                where.setdefault((command, name), os.path.relpath(page, REPO))
    assert {"python -m mvcom_tf.train", "python -m mvcom_tf.evaluate", "python -m mvcom_tf.embed"} <= set(used)
    commands = sorted(used)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each command starts its own Python
        helps = pool.map(lambda command: run_module([*module_args(command), "--helpfull"], timeout=300), commands)
    unknown = []
    for command, result in zip(commands, helps):
        defined = set(ABSL_FLAG.findall(result.stdout + result.stderr)) | ABSL_BUILTIN
        assert "flagfile" in ABSL_FLAG.findall(result.stdout + result.stderr), (command, result.stderr[-2000:])
        unknown += [f"{where[command, name]}: {command} --{name}" for name in sorted(used[command] - defined)]
    assert not unknown, unknown


def test_the_flag_pattern_reads_commands_as_written():
    text = "```bash\npython -m mvcom_tf.train --flagfile=a.cfg --seed=1 \\\n    --nodeterministic  # --not_a_flag\n```" \
           "\nRun `mvcom-embed --compare a.jpg b.jpg` or `python tools/convert_folder.py --root=x`."
    assert commands_in(text) == [("python -m mvcom_tf.train", ["flagfile", "seed", "deterministic"]),
                                 ("mvcom-embed", ["compare"]), ("python tools/convert_folder.py", ["root"])]


@pytest.mark.parametrize("command,flag", [("train", "--train_data"), ("evaluate", "--benchmark"),
                                          ("embed", "--compare")])
def test_help_lists_the_commands_own_flags(command, flag):
    listed = re.compile(rf"^  --(\[no\])?{flag.removeprefix('--')}:", re.MULTILINE)
    result = run_module(["-m", f"mvcom_tf.{command}", "--help"], timeout=120)
    assert listed.search(result.stdout + result.stderr), result.stdout[-2000:]
    script = shutil.which(f"mvcom-{command}")
    if script:  # the console script (requirements.txt installs it): its __main__ is pip's wrapper
        output = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
        assert listed.search(output.stdout + output.stderr), output.stdout[-2000:]
        assert "USAGE:" not in output.stdout  # the command's own usage text, not absl's stand-in
