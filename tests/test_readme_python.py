"""Every ```python block of the README runs as written, in order, as a reader would paste them.

The blocks name checkpoints (runs/tiny, runs/rm, runs/sft) that earlier stages would have
written: tiny ones are saved there first, and `train(num_iterations=N)` runs one iteration of
the N, so the test checks the calls (names, keywords, return values), not a long run. A block
that is a fragment of another (LoRA on `model`, `tokens`) runs in the namespace the earlier
blocks left, with `tokens` supplied.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from palm_rlhf import ByteTokenizer, GRPOTrainer, PPOTrainer, RewardConfig, RewardModel

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.M | re.S)


def test_the_readme_has_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert any("PPOTrainer(" in b and "reward_fn=" in b for b in blocks)
    assert any("GRPOTrainer(" in b for b in blocks)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = ByteTokenizer()
    for name in ("tiny", "sft"):
        tiny_model(num_tokens=tok.vocab_size, max_seq_len=256).save_pretrained(f"runs/{name}")
    trunk = tiny_model(seed=1, num_tokens=tok.vocab_size, max_seq_len=256)
    RewardModel(trunk, RewardConfig()).save_pretrained("runs/rm")
    iterations = []
    for trainer in (PPOTrainer, GRPOTrainer):
        real = trainer.train

        def one_iteration(self, num_iterations, *args, _real=real, **kwargs):
            iterations.append(num_iterations)
            return _real(self, 1, *args, **kwargs)

        monkeypatch.setattr(trainer, "train", one_iteration)
    namespace = {"tokens": torch.randint(0, tok.vocab_size, (2, 12))}
    for index, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - name the block that broke
            pytest.fail(f"README python block {index + 1} failed: {error!r}\n{block}")
    assert iterations == [20, 200]  # the PPO and GRPO blocks both trained, as the README says
    assert len(namespace["history"]) == 1 and "score_mean" in namespace["history"][0]
    assert namespace["trainer"].actor_scope == "actor"
