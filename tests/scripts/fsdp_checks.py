"""FSDP2 checks for every stage, in one launch (tests/test_fsdp.py compares the results).

    python fsdp_checks.py OUT one            # one process, the reference: no sharding, 2x batch
    accelerate launch ... fsdp_checks.py OUT two   # two CPU processes, sharded

Each process writes OUT/MODE_rank{r}.json. The supervised stages (pretrain as a full
fine-tune, LoRA SFT, a LoRA reward model with activation checkpointing, LoRA DPO accumulating two
micro-batches) run sharded on two processes with batch b and unsharded on one with batch 2b:
the same global batch, so the same losses and weights up to the reduction order. PPO and GRPO
sample per process, so their sharded run is compared with an unsharded run on the same two
processes. On two processes also: exact resume of a sharded run, a full fine-tune's
checkpoint written one gathered tensor at a time, decoding with a sharded policy where the
ranks stop at different steps (gathered, and sharded with a shared stop), a bf16 base with
float32 adapters in one unit, and `palm-rlhf ppo --fsdp` on the LoRA reward model's shared
base. In `one` mode a sharded pretrain on a world of one runs too (the GPU script's case).
"""

import json
import shutil
import sys
import weakref
from pathlib import Path

import torch
from accelerate import Accelerator

import palm_rlhf.storage.safetensors as safetensors_module
from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.cli import main as cli_main
from palm_rlhf.generation import generate
from palm_rlhf.model.reward import RewardConfig
from palm_rlhf.rl.config import GRPOConfig, PPOConfig
from palm_rlhf.rl.grpo import GRPOTrainer
from palm_rlhf.rl.online import all_processes
from palm_rlhf.rl.ppo import PPOTrainer
from palm_rlhf.storage.safetensors import tensor_digest
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.dpo import train_dpo
from palm_rlhf.training.fsdp import gathered, shard_models
from palm_rlhf.training.lm import train_lm
from palm_rlhf.training.reward import train_reward
from palm_rlhf.training.state import TrainingCheckpoints

TOK = ByteTokenizer()
SMALL = dict(num_tokens=TOK.vocab_size, dim=32, depth=2, heads=2, dim_head=16, max_seq_len=160)


def write_inputs(out: Path, accelerator: Accelerator) -> None:
    if accelerator.is_main_process and not (out / "inputs").exists():
        inputs = out / "inputs.tmp"
        (inputs / "corpus").mkdir(parents=True)
        for i in range(4):
            text = f"def f{i}(x):\n    return x * {i}\n" * 30
            (inputs / "corpus" / f"d{i}.txt").write_text(text)
        torch.manual_seed(0)
        PaLM(PaLMConfig(**SMALL)).save_pretrained(inputs / "init")
        with open(inputs / "pairs.jsonl", "w") as handle:  # equal lengths: equal weights
            for i in range(40):
                handle.write(json.dumps({"prompt": f"q{i:02d}", "response": f" a{i:02d}"}) + "\n")
        with open(inputs / "prefs.jsonl", "w") as handle:
            for i in range(40):
                responses = ["a" * (i % 5 + 1), "b" * (i % 3 + 1), "ab"]
                record = {"prompt": f"q{i}", "responses": responses, "ranking": [0, 2, 1]}
                handle.write(json.dumps(record) + "\n")
        inputs.rename(out / "inputs")
    accelerator.wait_for_everyone()


def train_config(batch_size: int = 2, fsdp: bool = False, **overrides) -> TrainConfig:
    values = dict(
        seq_len=24, batch_size=batch_size, steps=3, lr=1e-2, warmup_steps=1, log_every=1,
        eval_every=3, checkpoint_every=1, keep_checkpoints=3, seed=1, fsdp=fsdp,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


LM = dict(sample_every=2)  # the pretraining loop's own fields (and eval_batches)
HELDOUT = 0.125  # 5 of the 40 preference groups


def summary(history: list[dict], keys: tuple[str, ...]) -> list[list[float]]:
    return [[record[k] for k in keys] for record in history]


def checkpoint_digest(run: Path) -> str:
    return tensor_digest(PaLM.from_pretrained(run).state_dict())


def supervised_stages(out: Path, accelerator: Accelerator, batch: int, fsdp: bool) -> dict:
    inputs, result = out.parent / "inputs", {}
    # The same held-out rows whatever the batch: eval_batches x batch_size of them. Five
    # held-out preference groups (heldout_fraction) split 3 / 2 over two processes, so a
    # process with fewer held-out batches must keep step with the other (`in_lockstep`).
    lm = train_lm(
        PaLMConfig(**SMALL), train_config(batch, fsdp, **LM, eval_batches=8 // batch),
        out / "lm", accelerator=accelerator, show_progress=False, data=str(inputs / "corpus"),
    )  # fmt: skip
    result["lm"] = summary(lm, ("loss", "grad_norm"))
    result["lm_eval"] = lm[-1]["eval_bpb"]
    result["lm_digest"] = checkpoint_digest(out / "lm")
    sft = train_lm(
        None, train_config(batch, fsdp, **LM, eval_batches=8 // batch, lora_rank=4),
        out / "sft", init_checkpoint=inputs / "init", sft=True, accelerator=accelerator,
        show_progress=False, data=inputs / "pairs.jsonl",
    )  # fmt: skip
    result["sft"] = summary(sft, ("loss", "grad_norm"))
    result["sft_eval"] = sft[-1]["eval_bpb"]
    # Sharded, the reward trunk also recomputes its blocks in backward (checkpointing inside
    # the units): the same gradients.
    reward = train_reward(
        inputs / "init", inputs / "prefs.jsonl",
        train_config(batch, fsdp, activation_checkpointing=fsdp),
        RewardConfig(lora_rank=4), out / "reward", accelerator=accelerator, show_progress=False,
        heldout_fraction=HELDOUT,
    )  # fmt: skip
    result["reward"] = summary(reward, ("loss", "grad_norm", "accuracy"))
    result["reward_eval"] = reward[-1]["eval_accuracy"]
    # DPO accumulates: a step of batch b is two micro-batches of b / 2 (sharded gradients
    # reduce-scattered after each and summed), the same global batch again.
    dpo_batch = dict(batch_size=batch // 2, grad_accum=2) if fsdp else dict(batch_size=batch)
    dpo = train_dpo(
        inputs / "init", inputs / "prefs.jsonl", train_config(fsdp=fsdp, **dpo_batch),
        out_dir=out / "dpo", accelerator=accelerator, show_progress=False,
        heldout_fraction=HELDOUT,
    )  # fmt: skip
    result["dpo"] = summary(dpo, ("loss", "grad_norm", "reward_accuracy"))
    result["dpo_eval"] = [dpo[-1]["eval_reward_accuracy"], dpo[-1]["eval_reward_margin"]]
    return result


def resume_exactly(out: Path, accelerator: Accelerator) -> bool:
    """A copy of the sharded pretraining run, rewound to step 2 and resumed, ends with the same
    weights as the run that went straight to step 3."""
    straight, resumed = out / "lm", out / "lm_resumed"
    if accelerator.is_main_process:
        shutil.copytree(straight, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_0000003")
        pointer = {"step": 2, "dir": "step_0000002"}
        (resumed / "checkpoints" / "latest.json").write_text(json.dumps(pointer))
    accelerator.wait_for_everyone()
    train_lm(
        PaLMConfig(**SMALL), train_config(2, True, **LM, eval_batches=4), resumed, resume=True,
        accelerator=accelerator, show_progress=False, data=str(out.parent / "inputs" / "corpus"),
    )  # fmt: skip
    return checkpoint_digest(resumed) == checkpoint_digest(straight)


def streamed_save(out: Path, accelerator: Accelerator) -> dict:
    """Save a sharded full fine-tune while counting the gathered tensors alive at each gather:
    one at a time means the whole model is never held by one process."""
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(**SMALL)).train()
    shard_models([model], accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.loss(torch.randint(0, 256, (2, 16))).backward()
    optimizer.step()
    alive: list[weakref.ref] = []
    most = [0]
    real_whole = safetensors_module.whole

    def counting_whole(tensor):
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        full = real_whole(tensor)
        if full is not tensor:
            alive.append(weakref.ref(full))
        return full

    safetensors_module.whole = counting_whole
    try:
        TrainingCheckpoints(out / "streamed").save(1, model, optimizer, accelerator)
    finally:
        safetensors_module.whole = real_whole
    return {"gathers": len(alive), "most_alive": most[0], "params": len(list(model.parameters()))}


def uneven_decoding(accelerator: Accelerator) -> dict:
    """Rank 0's rows stop at their first token (every id but padding stops), rank 1's run to the
    limit: with the policy gathered once, neither waits for the other; the tokens equal an
    unsharded copy's, and a sharded forward afterwards still works on both ranks."""
    torch.manual_seed(0)
    policy = PaLM(PaLMConfig(**SMALL)).eval()
    whole = PaLM(PaLMConfig(**SMALL)).eval()
    whole.load_state_dict(policy.state_dict())
    shard_models([policy], accelerator)
    stops = list(range(1, 256)) if accelerator.process_index == 0 else None
    prompts = [[1, 2, 3], [4, 5]]
    kwargs = dict(max_new_tokens=12, temperature=1.0, eos_id=stops, pad_id=0)
    with gathered(policy):
        out = generate(policy, prompts, generator=torch.Generator().manual_seed(5), **kwargs)
    reference = generate(whole, prompts, generator=torch.Generator().manual_seed(5), **kwargs)
    # Sharded decoding: every step is a collective, so rank 0 decodes on (its rows finished,
    # masked) until rank 1's rows end too, and the output is cut where its own rows ended.
    sharded = generate(policy, prompts, generator=torch.Generator().manual_seed(5),
                       stop_together=all_processes(accelerator), **kwargs)  # fmt: skip
    with torch.no_grad():
        after = policy(torch.tensor([[1, 2, 3]]))
    return {
        "decoded": int(out.mask.sum()),
        "equal": bool(torch.equal(out.tokens, reference.tokens)),
        "sharded_equal": bool(torch.equal(sharded.tokens, reference.tokens)),
        "forward_after": bool(torch.allclose(after, whole(torch.tensor([[1, 2, 3]])), atol=1e-5)),
    }


def grpo(accelerator: Accelerator, fsdp: bool, **overrides) -> GRPOTrainer:
    torch.manual_seed(0)
    config = GRPOConfig(
        prompts_per_iteration=2, group_size=4, minibatch_size=4, max_new_tokens=6, lr=1e-2,
        no_eos_penalty=float("nan"), fsdp=fsdp, **overrides,
    )  # fmt: skip
    return GRPOTrainer(
        PaLM(PaLMConfig(**SMALL)), TOK, [f"p{i}" for i in range(32)],
        reward_fns=[lambda prompts, responses: [len(r) % 3 / 2 for r in responses]],
        config=config, accelerator=accelerator, show_progress=False,
    )  # fmt: skip


def ppo(accelerator: Accelerator, fsdp: bool) -> PPOTrainer:
    torch.manual_seed(0)
    config = PPOConfig(
        rollout_batch_size=4, minibatch_size=2, max_new_tokens=6, lr=1e-2, critic_lr=1e-2,
        no_eos_penalty=float("nan"), fsdp=fsdp,
    )  # fmt: skip
    return PPOTrainer(
        PaLM(PaLMConfig(**SMALL)), TOK, [f"p{i}" for i in range(32)],
        reward_fn=lambda prompts, responses: [len(r) % 3 / 2 for r in responses],
        config=config, accelerator=accelerator, show_progress=False,
    )  # fmt: skip


def trained_digest(trainer) -> str:
    """The digest of the trained tensors, gathered (a collective when sharded)."""
    return tensor_digest(trainer.trainable_state())


def online_stages(out: Path, accelerator: Accelerator) -> dict:
    result = {}
    for name, make in (("grpo", grpo), ("ppo", ppo)):
        for fsdp in (False, True):
            trainer = make(accelerator, fsdp)
            history = trainer.train(3)
            key = f"{name}_{'fsdp' if fsdp else 'plain'}"
            result[key] = [[m["score_mean"], m["kl_ref"], m["policy_loss"]] for m in history]
            state = trainer.trainable_state()
            result[f"{key}_sums"] = {
                k: (v.full_tensor() if hasattr(v, "full_tensor") else v).double().sum().item()
                for k, v in state.items()
            }
    # Decoding sharded (the processes stopping together) samples what decoding gathered does.
    sharded = grpo(accelerator, True, sample_gathered=False)
    result["grpo_sharded_decoding"] = [
        [m["score_mean"], m["kl_ref"], m["policy_loss"]] for m in sharded.train(3)
    ]
    # A sharded GRPO run saved after 2 iterations resumes exactly; its state loads anywhere.
    straight = grpo(accelerator, True)
    straight.train(2)
    straight.save(out / "grpo_state")
    result["grpo_saved_digest"] = trained_digest(straight)
    result["grpo_straight"] = straight.train(1)
    result["grpo_straight_digest"] = trained_digest(straight)
    resumed = grpo(accelerator, True)
    resumed.load(out / "grpo_state")
    result["grpo_resumed"] = resumed.train(1)
    result["grpo_resumed_digest"] = trained_digest(resumed)
    # A bf16 base and float32 adapters in the same units: the base is never touched.
    bf16 = grpo(accelerator, True, base_dtype="bfloat16")
    base_before = tensor_digest(bf16.policy.base_tensors())
    bf16.train(2)
    result["bf16_base_unchanged"] = tensor_digest(bf16.policy.base_tensors()) == base_before
    result["bf16_dtypes"] = sorted(
        {str(p.dtype) for p in bf16.policy.parameters() if not p.requires_grad}
        | {f"trained {p.dtype}" for p in bf16.actor_params}
    )
    return result


def ppo_command(out: Path, accelerator: Accelerator) -> int:
    """`palm-rlhf ppo --fsdp` with the sharded LoRA reward model trained above: its scope lands
    on the policy's own base (one base for every role), the whole base is sharded, and every
    process takes part in saving OUT/policy."""
    prompts = out / "prompts.txt"
    if accelerator.is_main_process:
        prompts.write_text("".join(f"p{i}\n" for i in range(16)))
    accelerator.wait_for_everyone()
    args = ["ppo", "--policy", str(out.parent / "inputs" / "init"), "--reward",
            str(out / "reward"), "--prompts", str(prompts), "--iterations", "2", "--cpu",
            "--fsdp", "--rollout-batch-size", "4", "--minibatch-size", "2",
            "--max-new-tokens", "6", "--out", str(out / "ppo_cli")]  # fmt: skip
    return cli_main(args)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    write_inputs(out, accelerator)
    rank = accelerator.process_index
    result = {"rank": rank, "world": accelerator.num_processes}
    run = out / mode
    if mode == "one":
        result.update(supervised_stages(run, accelerator, batch=4, fsdp=False))
        world_one = train_lm(
            PaLMConfig(**SMALL), train_config(4, True, **LM, eval_batches=2), run / "lm_world_one",
            accelerator=accelerator, show_progress=False, data=str(out / "inputs" / "corpus"),
        )  # fmt: skip
        result["lm_world_one"] = summary(world_one, ("loss", "grad_norm"))
    else:
        result.update(supervised_stages(run, accelerator, batch=2, fsdp=True))
        result["lm_resumed_exactly"] = resume_exactly(run, accelerator)
        result["streamed"] = streamed_save(run, accelerator)
        result["uneven"] = uneven_decoding(accelerator)
        result.update(online_stages(run, accelerator))
        result["ppo_command"] = ppo_command(run, accelerator)
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
