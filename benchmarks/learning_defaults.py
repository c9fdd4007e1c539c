"""Does the default online run optimise the user's reward? PPO and GRPO with and without
no_eos_penalty, from one briefly pretrained tiny model, 3 seeds.

The reward is a Python function the model can raise: the share of the commonest English letters
and spaces in the response. A model pretrained for 60 steps rarely ends a response within
max_new_tokens, which is when a no_eos_penalty replaces nearly every score. Printed per trainer
and setting: the held-out reward (4 samples per held-out prompt, fixed sampling seed) before and
after, the training eos rate, the share of scores shaping changed and the KL to the start;
medians and ranges over the seeds.

python benchmarks/learning_defaults.py --policy runs/tiny60 --out runs/learning_defaults
(--policy: `palm-rlhf pretrain --out runs/tiny60 --steps 60`)
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_memory import cpu_name

from palm_rlhf import ByteTokenizer, GRPOConfig, GRPOTrainer, PaLM, PPOConfig, PPOTrainer, generate
from palm_rlhf.data.prompts import stdlib_prompts
from palm_rlhf.tokenizers.base import encode_prompt

LETTERS = "etaoin "
TOK = ByteTokenizer()


def common_letters(prompts, responses, **fields):
    return [sum(c in LETTERS for c in r) / max(1, len(r)) for r in responses]


@torch.no_grad()
def heldout_reward(policy, prompts, scope, max_new_tokens):
    rows = [encode_prompt(TOK, p) for p in prompts for _ in range(4)]
    generator = torch.Generator().manual_seed(123)
    out = generate(policy, rows, max_new_tokens, temperature=1.0, eos_id=TOK.eos_id,
                   pad_id=TOK.pad_id, generator=generator, lora_scope=scope)  # fmt: skip
    text = [TOK.decode(t[m & (t != TOK.eos_id)]) for t, m in zip(out.tokens, out.mask, strict=True)]
    return sum(common_letters(None, text)) / len(text), text


def run(kind, penalty, seed, args, train, heldout):
    policy = PaLM.from_pretrained(args.policy).eval()
    before, _ = heldout_reward(policy, heldout, None, args.max_new_tokens)
    common = dict(max_new_tokens=args.max_new_tokens, no_eos_penalty=penalty, seed=seed)
    if kind == "grpo":
        config = GRPOConfig(prompts_per_iteration=4, **common)
        trainer = GRPOTrainer(policy, TOK, train, reward_fns=[common_letters], config=config,
                              show_progress=False)  # fmt: skip
    else:
        config = PPOConfig(**common)
        trainer = PPOTrainer(policy, TOK, train, reward_fns=[common_letters], config=config,
                             show_progress=False)  # fmt: skip
    began = time.perf_counter()
    history = trainer.train(args.iterations)
    after, text = heldout_reward(policy, heldout, "actor", args.max_new_tokens)
    return {
        "trainer": kind, "no_eos_penalty": penalty, "seed": seed, "before": before,
        "after": after, "eos_rate": statistics.mean(m["eos_rate"] for m in history),
        "shaped_share": statistics.mean(m["score_shaped_share"] for m in history),
        "kl_ref": history[-1]["kl_ref"], "seconds": time.perf_counter() - began,
        "sample": text[0],
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/learning_defaults"))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, heldout = stdlib_prompts(64, "train", seed=0), stdlib_prompts(32, "heldout", seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in ("grpo", "ppo"):
        for penalty in (-1.0, float("nan")):
            for seed in range(args.seeds):
                rows.append(run(kind, penalty, seed, args, train, heldout))
                print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\n{cpu_name()}, {args.iterations} iterations, "
          f"{args.seeds} seeds: median [min, max]")  # fmt: skip
    print("| trainer | no_eos_penalty | held-out reward before | after | gain | eos rate | "
          "scores shaped | KL to start |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")

    def cell(values, digits=3):
        low, mid, high = (
            f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values))
        )
        return f"{mid} [{low}, {high}]"

    for kind in ("grpo", "ppo"):
        for penalty in ("-1", "nan"):
            group = [
                r for r in rows if r["trainer"] == kind and f"{r['no_eos_penalty']:g}" == penalty
            ]
            print(f"| {kind} | {penalty} | {cell([r['before'] for r in group])} | "
                  f"{cell([r['after'] for r in group])} | "
                  f"{cell([r['after'] - r['before'] for r in group])} | "
                  f"{cell([r['eos_rate'] for r in group], 2)} | "
                  f"{cell([r['shaped_share'] for r in group], 2)} | "
                  f"{cell([r['kl_ref'] for r in group], 1)} |")  # fmt: skip


if __name__ == "__main__":
    main()
