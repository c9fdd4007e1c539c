"""Multi-process checks in one launch (starting 2 processes costs ~10 s, so they share it).

Run by tests/test_multiprocess.py under `accelerate launch` with 2 CPU processes. Each rank
writes OUT/rank{r}.json; the test compares the ranks.

1. reward training where a parameter gets no gradient: a rating head with ranking-only data,
   and a trunk that brings an adapter scope it never applies (lora_rank 0). DDP used to fail
   at step 2 ("Expected to have finished reduction in the prior iteration").
2. PPO with adaptive_kl: every rank keeps the same coefficient (it is updated from the KL
   averaged over processes), and actor and critic stay identical across ranks.
3. PPO save/resume: each rank's generators and RNG are saved and restored, so a resumed run
   reproduces the uninterrupted one's metrics.
4. train_lm's time limit is decided on rank 0: rank 1's clock runs a million times fast here,
   and both ranks still train every step (ranks that disagreed would hang).
"""

import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from palm_rlhf import ByteTokenizer, LoRAConfig, PaLM, PaLMConfig
from palm_rlhf.model.reward import RewardConfig
from palm_rlhf.rl.config import GRPOConfig, PPOConfig
from palm_rlhf.rl.grpo import GRPOTrainer
from palm_rlhf.rl.ppo import PPOTrainer
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.dpo import train_dpo
from palm_rlhf.training.lm import train_lm
from palm_rlhf.training.reward import train_reward

TOK = ByteTokenizer()
SMALL = dict(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)


def reward_with_unused_parameters(out: Path, accelerator: Accelerator) -> int:
    if accelerator.is_main_process:
        torch.manual_seed(0)
        trunk = PaLM(PaLMConfig(**SMALL))
        trunk.add_lora("actor", LoRAConfig(rank=2), freeze_base=False)
        trunk.save_pretrained(out / "trunk")
        rows = [
            {"prompt": f"q{i}", "responses": ["aa", "b", "ccc"], "ranking": [0, 2, 1]}
            for i in range(16)
        ]
        (out / "ranks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accelerator.wait_for_everyone()
    config = TrainConfig(
        seq_len=24,
        batch_size=2,
        steps=3,
        warmup_steps=1,
        log_every=1,
        eval_every=0,
        checkpoint_every=0,
    )
    history = train_reward(
        out / "trunk",
        out / "ranks.jsonl",
        config,
        RewardConfig(rating_bins=3, lora_rank=0),
        out / "rm",
        accelerator=accelerator,
        show_progress=False,
    )
    return len(history)


def ppo_trainer(accelerator: Accelerator, **overrides) -> PPOTrainer:
    torch.manual_seed(0)
    policy = PaLM(PaLMConfig(**SMALL))
    values = dict(
        rollout_batch_size=8,
        minibatch_size=4,
        max_new_tokens=6,
        lr=1e-2,
        critic_lr=1e-2,
        no_eos_penalty=float("nan"),
    )
    return PPOTrainer(
        policy,
        TOK,
        [f"p{i}" for i in range(32)],
        reward_fn=lambda prompts, responses: [len(r) % 3 / 2 for r in responses],
        config=PPOConfig(**{**values, **overrides}),
        accelerator=accelerator,
        show_progress=False,
    )


def grpo_trainer(accelerator: Accelerator) -> GRPOTrainer:
    torch.manual_seed(0)
    config = GRPOConfig(
        prompts_per_iteration=4,
        group_size=4,
        minibatch_size=8,
        max_new_tokens=6,
        lr=1e-2,
        no_eos_penalty=float("nan"),
        loss_type="dapo",
        scale_rewards="batch",
        dynamic_sampling=True,
    )
    return GRPOTrainer(
        PaLM(PaLMConfig(**SMALL)),
        TOK,
        [f"p{i}" for i in range(32)],
        reward_fns=[lambda prompts, responses: [len(r) % 3 / 2 for r in responses]],
        config=config,
        accelerator=accelerator,
        show_progress=False,
    )


def grpo_checks(out: Path, accelerator: Accelerator, result: dict) -> None:
    straight = grpo_trainer(accelerator)
    result["grpo_history"] = straight.train(2)
    straight.save(out / "grpo_state")
    result["grpo_straight"] = straight.train(2)
    state = straight.trainable_state()
    result["grpo_param_sums"] = {k: v.detach().double().sum().item() for k, v in state.items()}
    resumed = grpo_trainer(accelerator)
    resumed.load(out / "grpo_state")
    result["grpo_resumed"] = resumed.train(2)
    # What this rank sampled: the ranks must draw different prompts and responses.
    samples, _ = resumed.collect()
    result["grpo_prompts"] = samples.prompts


def dpo_checks(out: Path, accelerator: Accelerator, result: dict) -> None:
    if accelerator.is_main_process:
        torch.manual_seed(0)
        PaLM(PaLMConfig(**SMALL)).save_pretrained(out / "dpo_init")
        with open(out / "prefs.jsonl", "w") as handle:
            for i in range(40):
                responses = ["a" * (i % 5 + 1), "b" * (i % 3 + 1), "ab"]
                record = {"prompt": f"q{i}", "responses": responses, "ranking": [0, [1, 2]]}
                handle.write(json.dumps(record) + "\n")
    accelerator.wait_for_everyone()
    config = TrainConfig(
        seq_len=16,
        batch_size=2,
        steps=4,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        eval_every=4,
        checkpoint_every=2,
    )
    history = train_dpo(
        out / "dpo_init",
        out / "prefs.jsonl",
        config,
        out_dir=out / "dpo",
        accelerator=accelerator,
        show_progress=False,
    )
    result["dpo_history"] = history
    final = PaLM.from_pretrained(out / "dpo")
    result["dpo_adapter_sum"] = sum(
        v.double().sum().item() for k, v in final.state_dict().items() if ".dpo." in k
    )


def time_limit_from_rank0(out: Path, accelerator: Accelerator) -> int:
    if accelerator.is_main_process:
        (out / "corpus").mkdir()
        for i in range(4):
            (out / "corpus" / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x\n" * 20)
    accelerator.wait_for_everyone()
    real_clock = time.perf_counter
    if accelerator.process_index == 1:
        time.perf_counter = lambda: real_clock() * 1e6  # rank 1 thinks hours have passed
    try:
        history = train_lm(
            PaLMConfig(**SMALL),
            TrainConfig(
                seq_len=16,
                batch_size=2,
                steps=4,
                warmup_steps=1,
                log_every=1,
                eval_every=0,
                sample_every=0,
                checkpoint_every=0,
                time_limit_s=60.0,
            ),
            out / "lm",
            accelerator=accelerator,
            show_progress=False,
            data=str(out / "corpus"),
        )
    finally:
        time.perf_counter = real_clock
    return history[-1]["step"]


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    result = {"rank": accelerator.process_index, "world": accelerator.num_processes}

    result["reward_steps"] = reward_with_unused_parameters(out, accelerator)

    trainer = ppo_trainer(accelerator, adaptive_kl=True, kl_target=0.01, kl_horizon=10)
    result["kl_coefs"] = [m["kl_coef"] for m in trainer.train(3)]
    result["kl_coef_after"] = trainer.kl_controller.value
    state = trainer.trainable_state()
    result["param_sums"] = {k: v.detach().double().sum().item() for k, v in state.items()}

    straight = ppo_trainer(accelerator)
    straight.train(2)
    straight.save(out / "ppo_state")
    result["straight"] = straight.train(2)
    resumed = ppo_trainer(accelerator)
    resumed.load(out / "ppo_state")
    result["resumed"] = resumed.train(2)
    result["sampling_state"] = resumed.generator.get_state().double().sum().item()

    grpo_checks(out, accelerator, result)
    dpo_checks(out, accelerator, result)

    result["lm_last_step"] = time_limit_from_rank0(out, accelerator)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
