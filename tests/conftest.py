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


FLOAT32_ULPS = 64
"""How many float32 roundings (2**-23 each, relative) two computations of the same value may
differ by when they take different paths: a padded batch against each row alone, a KV cache
against a full forward, a folded adapter against an unfolded one. Each path sums its products
in another order, and the CPU's kernels pick their blocking by shape, alignment and instruction
set (AVX-512 on AMD EPYC, AMX-capable Xeons): the last bits differ between machines. A few dozen
roundings of the largest value compared covers that for these tiny models; a real bug (a wrong
position, a missing mask, an adapter left out) moves values by 1e-2 or more."""


def float32_bound(*values: torch.Tensor, ulps: float = FLOAT32_ULPS) -> float:
    """An absolute bound for comparing float32 results: `ulps` roundings of the largest
    magnitude among `values` (at least 1, so values near 0 get the bound of values near 1)."""
    scale = max(float(v.detach().abs().max()) for v in values if v.numel())
    return ulps * torch.finfo(torch.float32).eps * max(scale, 1.0)


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor, ulps: float = FLOAT32_ULPS):
    """assert_close with the absolute bound scaled to the magnitudes compared (FLOAT32_ULPS)."""
    bound = float32_bound(actual, expected, ulps=ulps)
    torch.testing.assert_close(actual, expected, atol=bound, rtol=0)


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


def count_checkpointed_blocks(monkeypatch) -> list[int]:
    """Patch the model's activation checkpoint with a counting wrapper; the list grows by one
    per checkpointed block call (a stage's --activation-checkpointing must reach its model)."""
    from palm_rlhf.model import palm as palm_module

    calls: list[int] = []
    original = palm_module.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(palm_module, "checkpoint", counted)
    return calls


def assert_same_run(first: list[dict], second: list[dict], keys: tuple[str, ...]) -> None:
    """Two runs' metric records agree on `keys` to a relative 1e-5 (losses and gradient norms
    of runs that must compute the same numbers by different means)."""
    assert len(first) == len(second) and first
    for a, b in zip(first, second, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test that changes mixed precision needs it
    cleared before and after (a real run sets it once per process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def save_policy_and_lora_reward(policy, directory):
    """Save `policy` and a LoRA reward model on its base (scope, heads and normalisation
    randomised, as if trained) under directory; returns (policy_dir, reward_dir)."""
    from palm_rlhf import PaLM
    from palm_rlhf.model.reward import RewardConfig, RewardModel

    policy.save_pretrained(directory / "policy")
    reward = RewardModel(PaLM.from_pretrained(directory / "policy"), RewardConfig(lora_rank=4))
    with torch.no_grad():
        for name, param in reward.named_parameters():
            if ".adapters.reward." in name or "head" in name:
                param.normal_(0, 0.3)
        reward.score_mean.fill_(0.5)
        reward.score_std.fill_(1.5)
    reward.save_pretrained(directory / "reward")
    return directory / "policy", directory / "reward"
