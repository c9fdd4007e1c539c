import socket
import sys

import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig


def tiny_config(**overrides) -> PaLMConfig:
    values = dict(num_tokens=40, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64)
    values.update(overrides)
    return PaLMConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> PaLM:
    torch.manual_seed(seed)
    model = PaLM(tiny_config(**overrides))
    # Bigger weights than the default init so logits differ clearly between tokens; otherwise
    # greedy ties and near-uniform distributions would make equality tests weak.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def free_port() -> int:
    """A TCP port the OS reports free right now: a fixed port can still be held by an earlier
    run (TIME_WAIT) or by another job on a shared machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_process_launch() -> list[str]:
    """`accelerate launch` of 2 real processes on CPU. `--multi_gpu` with Accelerator(cpu=True)
    in the script; `--cpu --num_processes 2` would silently start only one."""
    port = free_port()
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]
