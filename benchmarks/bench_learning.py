"""Which algorithm learns a verifiable task best from the same start and the same samples?

PPO (reward function + critic), GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++ and DPO, on two tasks
generated in code, from one SFT checkpoint per (task, seed), 3 seeds each. A measurement, not CI.

step 1. tasks: "add" (two-digit addition, "47+85=" -> "132") and "sort" (five digits sorted,
        "sort 38152=" -> "12358"); train and test problems never overlap
step 2. per (task, seed): SFT of a fresh tiny PaLM (dim 96, depth 2; 6,000 steps for add, the
        example's, 3,000 for sort, which this model learns sooner) on a sloppy demonstrator
        (60% of its answers wrong in one systematic way: one too many for addition, the
        first two digits swapped for sorting), so SFT leaves room that only the verifier fills
step 3. per algorithm, from that SFT checkpoint, with the same sample budget (--samples sampled
        responses): the online methods sample it over their iterations (GRPO-family: 32
        prompts x G=8 per iteration; PPO: 256 prompts x 1), DPO samples it from the SFT
        policy up front (8 per prompt), ranks them with the verifier (right above wrong) and
        trains on the pairs; every method trains a LoRA rank-8 adapter, lr 1e-3
step 4. held-out greedy exact-match accuracy on 300 test problems along the way, the KL to the
        SFT policy at the end (sampled held-out responses, sum of log-ratios, the same
        estimator for every method), wall time

Prints one table per task (median [min, max] over the seeds) and writes OUT/learning.png (held-out
accuracy against sampled responses, median over seeds) and OUT/results.jsonl.

python benchmarks/bench_learning.py --out runs/bench_learning   # ~40 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from bench_memory import cpu_name

from palm_rlhf import (
    ByteTokenizer,
    GRPOConfig,
    GRPOTrainer,
    PaLM,
    PaLMConfig,
    PPOConfig,
    PPOTrainer,
    generate,
)
from palm_rlhf.arithmetic import addition_problems, exact_match, sloppy_answer
from palm_rlhf.data.prompts import PromptRecord
from palm_rlhf.tokenizers.base import encode_prompt
from palm_rlhf.training.config import DPOConfig, TrainConfig
from palm_rlhf.training.dpo import train_dpo
from palm_rlhf.training.lm import train_lm

TOK = ByteTokenizer()
ALGORITHMS = {
    "PPO": None,
    "GRPO": dict(),
    "Dr. GRPO": dict(scale_rewards="none", loss_type="dr_grpo"),
    "DAPO": dict(loss_type="dapo", clip_high=0.28, dynamic_sampling=True, kl_coef=0.0),
    "RLOO": dict(estimator="rloo"),
    "REINFORCE++": dict(estimator="reinforce_pp"),
    "DPO": None,
}
PROMPTS, GROUP, LR = 32, 8, 1e-3


# ------------------------------------------------------------------------------- step 1. tasks


def sort_problems(count: int, split: str, seed: int) -> list[PromptRecord]:
    """Five random digits to sort; a problem's split is fixed by its digits (~10% test)."""
    rng, out, seen = random.Random(f"sort-{seed}-{split}"), [], set()
    while len(out) < count:
        digits = "".join(rng.choice("0123456789") for _ in range(5))
        in_test = sum(int(d) * 7**i for i, d in enumerate(digits)) % 10 == 0
        if digits in seen or in_test != (split == "test"):
            continue
        seen.add(digits)
        out.append(PromptRecord(f"sort {digits}=", {"answer": "".join(sorted(digits))}))
    return out


def sloppy_sort(problem: PromptRecord, rng: random.Random, error_rate: float) -> str:
    """Right 1 - error_rate of the time, else with its first two digits swapped: one systematic
    flaw, like addition's +1, so that SFT's most likely answer is the wrong one (errors spread
    over several places would leave the right answer the mode, and greedy decoding right)."""
    answer = problem.fields["answer"]
    if rng.random() >= error_rate:
        return answer
    return answer[1] + answer[0] + answer[2:]


TASKS = {
    "add": dict(
        problems=lambda n, split, seed: addition_problems(n, digits=2, split=split, seed=seed),
        sloppy=sloppy_answer, max_new_tokens=4, sft_steps=6000,
    ),
    "sort": dict(problems=sort_problems, sloppy=sloppy_sort, max_new_tokens=6, sft_steps=3000),
}  # fmt: skip


# ------------------------------------------------------------------------------- measurements


@torch.no_grad()
def accuracy(model: PaLM, problems, scope: str | None, max_new_tokens: int) -> float:
    rows = [encode_prompt(TOK, p.prompt) for p in problems]
    out = generate(model, rows, max_new_tokens, temperature=0, eos_id=TOK.eos_id,
                   pad_id=TOK.pad_id, lora_scope=scope)  # fmt: skip
    text = [TOK.decode(t[m & (t != TOK.eos_id)]) for t, m in zip(out.tokens, out.mask, strict=True)]
    return sum(exact_match(None, text, [p.fields["answer"] for p in problems])) / len(rows)


@torch.no_grad()
def kl_to_start(model: PaLM, problems, scope: str, max_new_tokens: int) -> float:
    """Mean over sampled held-out responses of sum_t log pi(y_t) - log pi_SFT(y_t), with the
    SFT policy being the same model with adapters off: one estimator for every method."""
    rows = [encode_prompt(TOK, p.prompt) for p in problems]
    out = generate(model, rows, max_new_tokens, temperature=1.0, eos_id=TOK.eos_id,
                   pad_id=TOK.pad_id, lora_scope=scope, seed=0)  # fmt: skip
    sequences = torch.cat((out.prompt_tokens, out.tokens), dim=1)
    mask = torch.cat((out.prompt_mask, out.mask), dim=1)
    p = out.prompt_tokens.shape[1]
    targets = sequences[:, p:]
    ref = model(sequences[:, :-1], mask=mask[:, :-1], targets=targets).logprobs
    pol = model(sequences[:, :-1], mask=mask[:, :-1], targets=targets, lora_scope=scope).logprobs
    return ((pol - ref) * out.mask).sum(dim=1).mean().item()


# ------------------------------------------------------------------------------- step 2. SFT


def sft_checkpoint(task: str, seed: int, out: Path, args) -> Path:
    directory = out / "sft" / f"{task}-{seed}"
    if (directory / "done").exists():
        return directory
    spec = TASKS[task]
    rng = random.Random(seed)
    train = spec["problems"](8000, "train", seed)
    rows = [{"prompt": p.prompt, "response": spec["sloppy"](p, rng, 0.6)} for p in train]
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = PaLMConfig(num_tokens=TOK.vocab_size, dim=96, depth=2, heads=4, dim_head=24,
                        max_seq_len=32)  # fmt: skip
    steps = args.sft_steps or spec["sft_steps"]
    train_config = TrainConfig(seq_len=24, batch_size=64, steps=steps, lr=3e-3, warmup_steps=20,
                               weight_decay=0.0, eval_every=0, sample_every=0,
                               checkpoint_every=steps, log_every=500, seed=seed)  # fmt: skip
    train_lm(config, train_config, directory / "run", sft=True, overwrite=True, data=str(data),
             show_progress=False)  # fmt: skip
    (directory / "done").write_text("")
    return directory


# ------------------------------------------------------------------------------- step 3. methods


def run_online(name, task, seed, start, train, test, args):
    spec = TASKS[task]
    policy = PaLM.from_pretrained(start / "run").eval()
    new = spec["max_new_tokens"]
    common = dict(max_new_tokens=new, max_prompt_tokens=16, lr=LR, seed=seed)
    if name == "PPO":
        batch = PROMPTS * GROUP  # one response per prompt: the same samples per iteration
        config = PPOConfig(rollout_batch_size=batch, minibatch_size=batch // 4, critic_lr=LR,
                           **common)  # fmt: skip
        trainer = PPOTrainer(policy, TOK, train, reward_fns=[exact_match], config=config,
                             show_progress=False)  # fmt: skip
    else:
        sizes = dict(prompts_per_iteration=PROMPTS, group_size=GROUP,
                     minibatch_size=PROMPTS * GROUP)  # fmt: skip
        config = GRPOConfig(**sizes, **common, **ALGORITHMS[name])
        trainer = GRPOTrainer(policy, TOK, train, reward_fns=[exact_match], config=config,
                              show_progress=False)  # fmt: skip
    per_iteration = PROMPTS * GROUP
    curve = [(0, accuracy(policy, test, None, new))]
    began, sampled = time.perf_counter(), 0
    while sampled < args.samples:
        # DAPO's dynamic sampling may draw several batches per iteration: the budget counts
        # what was drawn, so DAPO runs fewer iterations for the same samples.
        for _ in range(args.eval_every):
            metrics = trainer.train(1)[0]
            sampled += per_iteration * int(metrics.get("sampling_rounds", 1))
            if sampled >= args.samples:
                break
        curve.append((sampled, accuracy(policy, test, "actor", new)))
    seconds = time.perf_counter() - began
    return curve, kl_to_start(policy, test, "actor", new), seconds


def run_dpo(task, seed, start, train, test, args, out):
    spec = TASKS[task]
    policy = PaLM.from_pretrained(start / "run").eval()
    new = spec["max_new_tokens"]
    began = time.perf_counter()
    prompts = train[: args.samples // GROUP]
    rows = [encode_prompt(TOK, p.prompt) for p in prompts for _ in range(GROUP)]
    with torch.no_grad():
        sampled = generate(policy, rows, new, temperature=1.0, eos_id=TOK.eos_id,
                           pad_id=TOK.pad_id, seed=seed)  # fmt: skip
    text = [TOK.decode(t[m & (t != TOK.eos_id)]) for t, m in zip(sampled.tokens, sampled.mask,
                                                                  strict=True)]  # fmt: skip
    lines = []
    for i, problem in enumerate(prompts):
        responses = text[i * GROUP : (i + 1) * GROUP]
        right = exact_match(None, responses, [problem.fields["answer"]] * GROUP)
        good = [j for j, r in enumerate(right) if r]
        bad = [j for j, r in enumerate(right) if not r]
        if good and bad:  # the verifier's ranking: every right answer above every wrong one
            lines.append(json.dumps({"prompt": problem.prompt, "responses": responses,
                                     "ranking": [good, bad]}))  # fmt: skip
    curve = [(0, accuracy(policy, test, None, new))]
    if not lines:  # every group all right or all wrong: the verifier ranks nothing
        return curve + [(args.samples, curve[0][1])], 0.0, time.perf_counter() - began, 0
    data = out / "dpo" / f"{task}-{seed}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(lines) + "\n")
    steps = max(1, args.dpo_epochs * len(lines) // 16)
    config = TrainConfig(seq_len=24, batch_size=16, steps=steps, lr=args.dpo_lr, warmup_steps=10,
                         eval_every=0, log_every=50, checkpoint_every=steps, weight_decay=0.0,
                         seed=seed)  # fmt: skip
    run_dir = out / "dpo" / f"{task}-{seed}"
    train_dpo(start / "run", data, config, DPOConfig(), run_dir, heldout_fraction=0.05,
              show_progress=False, overwrite=True)  # fmt: skip
    trained = PaLM.from_pretrained(run_dir).eval()
    curve.append((args.samples, accuracy(trained, test, "dpo", new)))
    seconds = time.perf_counter() - began
    return curve, kl_to_start(trained, test, "dpo", new), seconds, len(lines)


# ------------------------------------------------------------------------------- step 4. report


def cell(values, digits=3):
    low, mid, high = (f"{v:.{digits}f}" for v in (min(values), statistics.median(values),
                                                  max(values)))  # fmt: skip
    return f"{mid} [{low}, {high}]"


def report(rows, args):
    print(f"\n{cpu_name()}, torch {torch.__version__}, {args.samples} sampled responses per "
          f"run, seeds {args.seeds}: median [min, max]")  # fmt: skip
    for task in TASKS:
        print(f"\n{task}\n")
        print("| algorithm | SFT accuracy | final accuracy | gain (points) | KL to SFT (nats) "
              "| wall time (s) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for name in ALGORITHMS:
            group = [r for r in rows if r["task"] == task and r["algorithm"] == name]
            if not group:
                continue
            start = [r["curve"][0][1] for r in group]
            final = [r["curve"][-1][1] for r in group]
            gains = [100 * (f - s) for f, s in zip(final, start, strict=True)]
            print(f"| {name} | {cell(start)} | {cell(final)} | {cell(gains, 1)} | "
                  f"{cell([r['kl'] for r in group], 2)} | "
                  f"{cell([r['seconds'] for r in group], 0)} |")  # fmt: skip
    plot(rows, args.out / "learning.png")


def plot(rows, path):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no PNG (the curves are in results.jsonl)")
        return
    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(TASKS), sharey=True)
    for ax, task in zip(axes, TASKS, strict=True):
        for name in ALGORITHMS:
            group = [r["curve"] for r in rows if r["task"] == task and r["algorithm"] == name]
            if not group:
                continue
            xs = [x for x, _ in group[0]]
            ys = [statistics.median(c[i][1] for c in group) for i in range(len(xs))]
            style = "s--" if name == "DPO" else "o-"
            ax.plot(xs, ys, style, ms=3, label=name)
        ax.set_title(f"{task}: held-out exact match (median of seeds)")
        ax.set_xlabel("sampled responses")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("greedy exact-match accuracy")
    axes[-1].legend(loc="lower right")
    fig.savefig(path)
    print(f"curves: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--out", type=Path, default=Path("runs/bench_learning"))
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    add("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    add("--samples", type=int, default=256 * 40, help="sampled responses per run")
    add("--eval-every", type=int, default=5, help="iterations between held-out evaluations")
    add(
        "--sft-steps",
        type=int,
        default=0,
        help="SFT steps for every task (default: 6000 for add, as examples/grpo_arithmetic.py, "
        "whose SFT checkpoints are the same; 3000 for sort)",
    )
    add("--dpo-epochs", type=int, default=2)
    add("--dpo-lr", type=float, default=LR, help="DPO's learning rate (default: the others')")
    add("--test-problems", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    done = {(r["task"], r["seed"], r["algorithm"]) for r in rows}
    for task in args.tasks:
        for seed in args.seeds:
            start = sft_checkpoint(task, seed, args.out, args)
            train = TASKS[task]["problems"](8000, "train", seed)
            test = TASKS[task]["problems"](args.test_problems, "test", seed)
            for name in args.algorithms:
                if (task, seed, name) in done:
                    continue
                extra = {}
                if name == "DPO":
                    curve, kl, seconds, pairs = run_dpo(task, seed, start, train, test, args,
                                                        args.out)  # fmt: skip
                    extra["ranked_groups"] = pairs
                else:
                    curve, kl, seconds = run_online(name, task, seed, start, train, test, args)
                row = {"task": task, "seed": seed, "algorithm": name, "curve": curve, "kl": kl,
                       "seconds": seconds, **extra}  # fmt: skip
                rows.append(row)
                with open(results, "a") as handle:  # a stopped run resumes where it was
                    handle.write(json.dumps(row) + "\n")
                print(f"{task} seed {seed} {name}: {curve[0][1]:.3f} -> {curve[-1][1]:.3f}, "
                      f"KL {kl:.2f}, {seconds:.0f} s", flush=True)  # fmt: skip
    report(rows, args)


if __name__ == "__main__":
    main()
