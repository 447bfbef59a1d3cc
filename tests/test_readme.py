"""Every command in README.md runs as written.

Commands that need only this repository (the demo model, the sample corpus) are run in README
order; commands that need a TPU, a GPU, a bucket or the 2.8B checkpoint are parsed with `--help`;
commands that read Debian data (SYSTEM_DATA) run in their own test, which skips with the reason
where the data is absent. `make` lines are the quickstart itself or `make vocab`, which
tests/test_vocab_builder.py covers. The demo model models/demo is committed: its absence fails.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import require_debian_data
from gptsan.vocab_builder import DEFAULT_UNICODE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Markers of commands that need resources this machine doesn't have: run with --help only.
HELP_ONLY_MARKERS = ("gs://", "TPU_NAME", "GPTSAN-japanese", "models/gptsan-", "records/*.tfrecord")
OUTPUTS = ("/tmp/gptsan_hybrid_0000.tfrecord", "/tmp/gptsan_tiny", "/tmp/gptsan_vector.json",
           "/tmp/ja-swe8k.txt", "/tmp/emoji8k.json", "/tmp/gptsan_sample.npz")
COMMAND_TIMEOUT_S = 300
# README commands that read system data files: marker -> (paths, the Debian packages with them).
SYSTEM_DATA = {"scripts/build_vocab.py": (os.path.join(DEFAULT_UNICODE_DIR, "emoji"),
                                          "unicode-data")}


def readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^```\n(.*?)^```", f.read(), re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("python ")]


def test_readme_has_commands_for_every_task():
    scripts = {shlex.split(c)[1] for c in readme_commands()}
    assert {"run_generate.py", "run_languagemodel.py", "run_train.py", "encode_swe.py",
            "scripts/convert_checkpoint.py", "scripts/add_layers.py", "scripts/make_tfrecord.py",
            "scripts/show_tfrecord.py", "scripts/build_vocab.py"} <= scripts


def test_readme_flag_table_matches_the_clis():
    """The "Every CLI flag" table is exactly what scripts/readme_flags.py prints now."""
    table = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "readme_flags.py")],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index(table[0])
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    assert lines[start:end] == table, (
        "README flag table is stale: python scripts/readme_flags.py and paste it")


def system_data(command):
    """(paths, Debian packages) of the system data a README command reads, or None."""
    return next((need for marker, need in SYSTEM_DATA.items() if marker in command), None)


def run_readme_command(command):
    argv = shlex.split(command)
    argv[0] = sys.executable
    if any(marker in command for marker in HELP_ONLY_MARKERS):
        argv = argv[:2] + ["--help"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, command


def test_every_readme_command_runs():
    """Every README command in order, except those reading Debian data (next test)."""
    for path in OUTPUTS:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    for command in readme_commands():
        if system_data(command) is None:
            run_readme_command(command)


def test_readme_commands_reading_debian_data_run():
    """The commands that read Debian's data files: skipped with the reason where the data is
    absent (`make vocab-data` installs it; .ci/run does, and makes absence an error)."""
    commands = [c for c in readme_commands() if system_data(c) is not None]
    assert commands, "SYSTEM_DATA matches no README command: update it"
    for command in commands:
        require_debian_data(*system_data(command))
        run_readme_command(command)
