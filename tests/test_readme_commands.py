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
from conftest import free_port

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


MULTI_MACHINE = readme_commands(r"^accelerate launch .*--num_machines \$MACHINES")


def test_the_readme_shows_the_several_machines_command():
    assert len(MULTI_MACHINE) == 1
    for flag in ("--machine_rank", "--main_process_ip", "--main_process_port", "--fsdp"):
        assert flag in MULTI_MACHINE[0]


def test_readme_several_machines_command_runs_as_two_machines_on_this_one(tmp_path):
    # The line as written, in a shell, once per machine rank, both launchers at once: 2
    # machines x 1 process, joined over 127.0.0.1 into one sharded world of 2.
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MACHINES="2",
        GPUS="1",
        MAIN_IP="127.0.0.1",
        MAIN_PORT=str(free_port()),
    )
    launchers = [
        subprocess.Popen(
            ["bash", "-c", MULTI_MACHINE[0]],
            cwd=tmp_path,
            env={**env, "MACHINE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    for launcher, (_, stderr) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, stderr[-4000:]
    done = [re.search(r"^done(?: \(process 1\))?: (.*); processes=(\d+)", stdout, re.M)
            for stdout, _ in outputs]  # fmt: skip
    assert all(done), [stdout[-2000:] for stdout, _ in outputs]
    assert [d.group(2) for d in done] == ["2", "2"]  # one world of 2 processes
    assert "(process 1)" in outputs[1][0]  # machine 1 ran the world's second process
    assert done[0].group(1) == done[1].group(1)  # the same step, loss, lr and grad norm
    words = shlex.split(MULTI_MACHINE[0])
    out = tmp_path / words[words.index("--out") + 1]
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert pointer["step"] == int(words[words.index("--steps") + 1])


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
