"""The README's multi-process commands, run exactly as written (a documented command that
silently starts one process is a bug: examples/accelerate/cpu_2proc.yaml once did)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands(pattern: str) -> list[str]:
    """Command lines in the README's ```bash blocks that match `pattern` (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#") and re.search(pattern, command):
                lines.append(command)
    return lines


CPU_LAUNCHES = readme_commands(r"^accelerate launch .*cpu_2proc\.yaml")


def test_the_readme_documents_a_two_cpu_process_command():
    assert CPU_LAUNCHES, "the README shows no `accelerate launch` command for 2 CPU processes"


@pytest.mark.parametrize("command", CPU_LAUNCHES)
def test_readme_cpu_launch_really_runs_two_processes(command, tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        shlex.split(command),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "processes=2" in result.stdout, result.stdout[-2000:]
    words = shlex.split(command)
    out = tmp_path / words[words.index("--out") + 1]
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    state = json.loads((out / "checkpoints" / pointer["dir"] / "train_state.json").read_text())
    assert ["num_processes", 2] in state["__dict__"]  # the checkpoint saw a world of 2


def readme_cli_lines() -> list[str]:
    """Every `palm-rlhf ...` line of the README's bash blocks, continuations joined."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith("palm-rlhf "):
                lines.append(command)
    return lines


def test_the_readme_shows_every_rl_command():
    subcommands = {shlex.split(line)[1] for line in readme_cli_lines()}
    assert {"pretrain", "reward", "grpo", "dpo", "demo", "label"} <= subcommands


@pytest.mark.parametrize("command", readme_cli_lines())
def test_every_readme_cli_line_parses(command):
    # A renamed or removed flag leaves the README lying; argparse refuses it here.
    from palm_rlhf.cli import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.run)
