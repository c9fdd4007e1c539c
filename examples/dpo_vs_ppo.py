"""DPO and RM + PPO side by side, on the same rankings, from the same SFT policy.

step 1. a finished `palm-rlhf demo --out DEMO --seed S` run: its SFT checkpoint, its simulated
        labeler's rankings (rankings.jsonl) and its summary (the rule score after SFT and after
        RM + PPO on the held-out files' docstring prompts)
step 2. DPO from that SFT checkpoint on those rankings, once per --loss-type
step 3. the rule score of each DPO policy on the demo's own evaluation prompts, sampled with
        the demo's evaluation seed; OUT/comparison.json holds every figure

palm-rlhf demo --out runs/demo --seed 0            # 13 minutes on 2 cores
python examples/dpo_vs_ppo.py --demo runs/demo      # about 3 more
"""

import argparse
import json
import time
from pathlib import Path

from palm_rlhf import ByteTokenizer, DPOConfig, PaLM, train_dpo
from palm_rlhf.demo import SETTINGS, demo_prompts, rule_eval
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.state import TrainingCheckpoints


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--demo", type=Path, required=True, help="a finished demo run directory")
    add("--out", type=Path, default=None, help="[DEMO/dpo_vs_ppo]")
    add("--loss-type", action="append", default=None, help="[sigmoid and plackett_luce]")
    add("--steps", type=int, default=150)
    add("--lr", type=float, default=5e-4)
    add("--beta", type=float, default=0.1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    summary = json.loads((args.demo / "summary.json").read_text())
    seed, preset = summary["seed"], summary["preset"]
    out = args.out or args.demo / "dpo_vs_ppo"
    settings, tok = SETTINGS[preset], ByteTokenizer()
    sft_dir = TrainingCheckpoints(args.demo / "sft" / "checkpoints").latest()
    _, _, eval_pairs = demo_prompts(settings, seed)
    rankings = args.demo / "rankings.jsonl"
    results = {
        "seed": seed,
        "ranked_groups": summary["ranked_groups"],
        "rule_score_sft": summary["rule_score_sft"],
        "rule_score_rm_ppo": summary["rule_score_after"],
        "rm_ppo_kl_to_reference": summary["heldout_kl_to_reference"],
        "dpo": {},
    }
    for loss_type in args.loss_type or ["sigmoid", "plackett_luce"]:
        began = time.perf_counter()
        config = TrainConfig(seq_len=192, batch_size=8, steps=args.steps,
                             lr=args.lr, warmup_steps=10, eval_every=args.steps, log_every=10,
                             checkpoint_every=args.steps, weight_decay=0.0, seed=seed)  # fmt: skip
        history = train_dpo(sft_dir, rankings, config, DPOConfig(loss_type=loss_type,
                            beta=args.beta), out / loss_type, overwrite=True)  # fmt: skip
        policy = PaLM.from_pretrained(out / loss_type)
        judged = rule_eval(policy, tok, eval_pairs, settings.response_tokens, "dpo", seed + 2)
        results["dpo"][loss_type] = {
            "rule_score": judged.score,
            "distinct_share": judged.distinct_share,
            "mean_chars": judged.mean_chars,
            "heldout_reward_accuracy": history[-1].get("eval_reward_accuracy"),
            "seconds": round(time.perf_counter() - began, 1),
            "sample": judged.texts[0],
        }
        print(f"DPO ({loss_type}): rule score {judged.score:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "dpo"}))
    for loss_type, figures in results["dpo"].items():
        print(loss_type, {k: v for k, v in figures.items() if k != "sample"})


if __name__ == "__main__":
    main()
