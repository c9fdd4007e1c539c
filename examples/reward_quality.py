"""How well does a reward model learn the simulated labeler's rankings? And is the metric honest?

step 1. a pretrained tiny PaLM (`--init`), e.g. from the README's 9-minute command
        palm-rlhf pretrain --preset tiny --data stdlib --steps 780 --lr 2e-3 \
            --warmup-steps 50 --out runs/tiny
step 2. it samples K continuations of stdlib prompts; the labeler (label/simulated.py) ranks them;
        held-out prompts come from the corpus's held-out files
step 3. a reward model trained on the rankings: held-out pairwise accuracy
step 4. the same responses with each group's ranks shuffled: accuracy should stay near 50%

python examples/reward_quality.py --out runs/rm_quality --init runs/tiny
    # 45 minutes on 2 cores: labelling 12 min, then two reward models of 15 min each

Labels are reused when out/labels.json matches the labelling settings, so the reward-model runs
can be repeated with other settings without sampling again.
"""

import argparse
import json
import random
import time
from pathlib import Path

from palm_rlhf import ByteTokenizer, PaLM
from palm_rlhf.data.preferences import PreferenceGroup, load_preferences
from palm_rlhf.data.prompts import stdlib_prompts
from palm_rlhf.label.simulated import label_samples, write_rankings
from palm_rlhf.model.reward import RewardConfig, RewardModel
from palm_rlhf.storage.atomic import write_bytes_atomic
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.reward import heldout_accuracy, train_reward


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--out", type=Path, default=Path("runs/rm_quality"))
    add("--init", type=Path, required=True, help="a pretrained PaLM checkpoint or run directory")
    add("--train-prompts", type=int, default=12000)
    add("--heldout-prompts", type=int, default=400)
    add("--responses", type=int, default=4, help="K responses ranked per prompt")
    add("--response-tokens", type=int, default=48)
    add("--steps", type=int, default=2000, help="reward-model optimizer steps")
    add("--lr", type=float, default=3e-4)
    add("--lora-rank", type=int, default=0, help="0 = full fine-tune of the trunk")
    add("--seq-len", type=int, default=96)
    add("--skip-shuffled", action="store_true", help="skip step 4, the shuffled-label control")
    add("--seed", type=int, default=0)
    return parser.parse_args()


def shuffled_ranks(groups: list[PreferenceGroup], seed: int) -> list[PreferenceGroup]:
    """The same responses with each group's ranks permuted at random: no signal is left."""
    rng, out = random.Random(seed), []
    for group in groups:
        ranks = list(group.ranks)
        rng.shuffle(ranks)
        out.append(PreferenceGroup(group.prompt, group.responses, ranks))
    return out


def fit_and_score(args, init: Path, data: Path, heldout: list, out: Path) -> dict:
    config = TrainConfig(
        seq_len=args.seq_len,
        batch_size=8,
        steps=args.steps,
        lr=args.lr,
        warmup_steps=50,
        weight_decay=0.0,
        eval_every=max(1, args.steps // 4),
        log_every=max(1, args.steps // 20),
        checkpoint_every=0,
        seed=args.seed,
    )
    began = time.perf_counter()
    # overwrite: the labels are reused across runs (see the docstring), the reward models not.
    reward_config = RewardConfig(lora_rank=args.lora_rank)
    history = train_reward(init, data, config, reward_config, out, overwrite=True)
    model = RewardModel.from_pretrained(out)  # the run directory: its latest checkpoint
    accuracy = heldout_accuracy(model, heldout, ByteTokenizer(), model.max_row_len)
    return {
        "heldout_files_accuracy": accuracy,
        "heldout_prompts_accuracy": history[-1][
            "eval_accuracy"
        ],  # 10% of the prompts, held out by prompt
        "train_accuracy_last": history[-1]["accuracy"],
        "seconds": round(time.perf_counter() - began),
    }


def main() -> None:
    args, tokenizer = parse_args(), ByteTokenizer()
    args.out.mkdir(parents=True, exist_ok=True)

    # step 1. the pretrained model: it writes the continuations and is the reward model's trunk
    init, policy = args.init, PaLM.from_pretrained(args.init)  # a bad --init fails here, early

    # step 2. simulated labels, train prompts and held-out-file prompts
    spec = {
        key: str(getattr(args, key))
        for key in (
            "init",
            "train_prompts",
            "heldout_prompts",
            "responses",
            "response_tokens",
            "seed",
        )
    }
    train_path, heldout_path = args.out / "rankings.jsonl", args.out / "heldout.jsonl"
    spec_path = args.out / "labels.json"
    if not spec_path.exists() or json.loads(spec_path.read_text()) != spec:
        for path, split, count, seed in (
            (train_path, "train", args.train_prompts, args.seed),
            (heldout_path, "heldout", args.heldout_prompts, args.seed + 1),
        ):
            prompts = stdlib_prompts(count, split, seed)
            groups = label_samples(
                policy, tokenizer, prompts, args.responses, args.response_tokens, seed=seed
            )
            write_rankings(groups, path)
        write_bytes_atomic(spec_path, json.dumps(spec).encode())
    train_groups = load_preferences(train_path).groups
    heldout_groups = load_preferences(heldout_path).groups
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ranked_groups": {"train": len(train_groups), "heldout": len(heldout_groups)},
    }

    # step 3. the reward model on the labeler's rankings
    results["real"] = fit_and_score(args, init, train_path, heldout_groups, args.out / "rm_real")
    print("real labels:", results["real"], flush=True)

    # step 4. the control: same responses, shuffled ranks, scored against the real held-out ranks
    if not args.skip_shuffled:
        shuffled_path = args.out / "rankings_shuffled.jsonl"
        write_rankings(shuffled_ranks(train_groups, args.seed), shuffled_path)
        results["shuffled"] = fit_and_score(
            args, init, shuffled_path, heldout_groups, args.out / "rm_shuffled"
        )
        print("shuffled labels:", results["shuffled"], flush=True)
    write_bytes_atomic(args.out / "results.json", json.dumps(results, indent=2).encode() + b"\n")


if __name__ == "__main__":
    main()
