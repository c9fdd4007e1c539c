"""One PPO iteration per process; used by tests under `accelerate launch` with 2 processes."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.config import PPOConfig
from palm_rlhf.ppo import PPOTrainer


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    tok = ByteTokenizer()
    torch.manual_seed(0)
    policy = PaLM(
        PaLMConfig(num_tokens=tok.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    reward_fn = lambda prompts, responses: [len(r) % 3 / 2 for r in responses]  # noqa: E731
    config = PPOConfig(
        rollout_batch_size=8,
        minibatch_size=4,
        max_new_tokens=6,
        lr=1e-2,
        critic_lr=1e-2,
        no_eos_penalty=float("nan"),
    )
    trainer = PPOTrainer(
        policy,
        tok,
        [f"p{i}" for i in range(32)],
        reward_fn=reward_fn,
        config=config,
        accelerator=accelerator,
        show_progress=False,
    )
    trainer.train(1)
    state = trainer._trainable_state()
    result = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "sums": {k: v.detach().double().sum().item() for k, v in state.items()},
        "first": {k: v.detach().flatten()[:4].tolist() for k, v in state.items()},
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
