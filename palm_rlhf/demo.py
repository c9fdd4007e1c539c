"""`palm-rlhf demo`: the whole RLHF pipeline on the built-in stdlib corpus, offline, on a CPU.

step 1. pretrain a tiny PaLM on the Python standard library's sources
step 2. SFT on (signature + docstring) -> body pairs mined from the training files
step 3. sample K bodies per training-file docstring prompt from the SFT policy; the simulated
        labeler (label/simulated.py) ranks them, or people on the ranking page (`--human`)
step 4. train a reward model (from the SFT model) on those rankings only
step 5. PPO from the SFT policy against the reward model
step 6. on held-out files' docstring prompts: the rule's score after pretraining, SFT and
        PPO with the share of distinct responses and their mean length (a rising score with
        one repeated answer would be an exploit, not a gain), reward-model accuracy, KL to
        the reference, samples; score and KL per PPO iteration (ppo_curves.csv, and a PNG
        with matplotlib); summary.json

Each training stage has a time budget (it stops early, with a checkpoint, once its budget is
spent), and the run as a whole has one that PPO, the last stage, gives way to, so a slower
machine gets a weaker demo, not a longer one.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import preset_config
from .data.docstrings import DocstringPair, stdlib_docstring_pairs
from .label.human import HumanLabeling, rank_by_people
from .label.simulated import (
    body_score,
    label_samples,
    parse_share,
    sample_completions,
    write_rankings,
)
from .model.palm import PaLM
from .model.reward import RewardConfig, RewardModel
from .plot import write_ppo_curves
from .rl.config import PPOConfig
from .rl.ppo import PPOTrainer
from .storage.atomic import write_bytes_atomic
from .tokenizers.base import ByteTokenizer, Tokenizer
from .training.config import TrainConfig
from .training.lm import train_lm
from .training.reward import heldout_accuracy, train_reward
from .training.runs import claim_run_dir
from .training.state import TrainingCheckpoints

DEMO_RUN_MARKERS = (
    "pretrain",
    "reward",
    "policy",
    "sft",
    "sft.jsonl",
    "rankings.jsonl",
    "tasks.jsonl",
    "ppo_metrics.jsonl",
    "ppo_curves.csv",
    "ppo_curves.png",
    "summary.json",
)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of each stage; `full` is sized to take at most 14.5 minutes on a 2-core AMD EPYC
    (the budgets stop each training stage early on a slower machine)."""

    pretrain_steps: int
    sft_examples: int
    """(signature + docstring) -> body pairs from the training files that SFT trains on."""
    sft_steps: int
    label_prompts: int
    """Training-file docstring prompts (distinct from SFT's) that are sampled, ranked, and
    then used by PPO."""
    eval_samples: int
    """Samples per held-out docstring prompt for the rule score (the held-out files hold only
    ~50 such prompts, so each is sampled several times)."""
    heldout_groups_per_prompt: int
    """Ranked groups per held-out prompt that measure the reward model's accuracy."""
    responses_per_prompt: int
    response_tokens: int
    reward_steps: int
    ppo_iterations: int
    model_overrides: dict[str, Any]
    pretrain_budget_s: float = 0.0
    """Seconds each stage may take at most (0 = no limit)."""
    sft_budget_s: float = 0.0
    reward_budget_s: float = 0.0
    ppo_budget_s: float = 0.0
    total_budget_s: float = 0.0
    """The whole run's seconds (0 = no limit). The stages before PPO run on their own budgets;
    their unbudgeted work (loading, evaluations) comes out of PPO's, which is cut to what is
    left once the final evaluation is paid for (`ppo_time_limit`)."""


SETTINGS = {
    "full": DemoSettings(
        pretrain_steps=300,
        sft_examples=2000,
        sft_steps=90,
        label_prompts=512,
        eval_samples=8,
        heldout_groups_per_prompt=2,
        responses_per_prompt=4,
        response_tokens=48,
        reward_steps=110,
        ppo_iterations=32,
        model_overrides={},
        # The budgets stop a slower machine early (summary.json's steps_run says whether they
        # did); 870 s leaves PPO's overrun of its limit by up to one iteration (~8 s) inside
        # the 15 minutes.
        pretrain_budget_s=260.0,
        sft_budget_s=80.0,
        reward_budget_s=180.0,
        ppo_budget_s=185.0,
        total_budget_s=870.0,
    ),
    "smoke": DemoSettings(
        pretrain_steps=40,
        sft_examples=64,
        sft_steps=4,
        label_prompts=24,
        eval_samples=1,
        heldout_groups_per_prompt=1,
        responses_per_prompt=4,
        response_tokens=32,
        reward_steps=4,
        ppo_iterations=2,
        model_overrides=dict(dim=64, depth=2, heads=2),
    ),
}


def demo_prompts(
    settings: DemoSettings, seed: int
) -> tuple[list[DocstringPair], list[DocstringPair], list[DocstringPair]]:
    """SFT pairs and labelling/PPO pairs from the training files (disjoint), and the rule's
    evaluation pairs from the held-out files only (each repeated eval_samples times). A pair's
    response is the real body, which the simulated labeler compares with."""
    train = stdlib_docstring_pairs(settings.sft_examples + settings.label_prompts, "train", seed)
    sft_pairs = train[: settings.sft_examples]
    label_pairs = train[settings.sft_examples :]
    heldout = stdlib_docstring_pairs(10_000, "heldout", seed)
    return sft_pairs, label_pairs, heldout * settings.eval_samples


class RuleEval(NamedTuple):
    """One sampled response per evaluation pair, judged by the simulated labeler's rule."""

    score: float
    """Mean `body_score` (the demo's rule)."""
    parse_share: float
    """Mean `parse_share`: the earlier rule, that any short line which parses satisfies."""
    distinct_share: float
    """Distinct responses / responses (whitespace-stripped): 1/n for one repeated answer."""
    mean_chars: float
    """Mean response length in characters."""
    texts: list[str]


@torch.no_grad()
def rule_eval(
    policy: PaLM,
    tokenizer: Tokenizer,
    pairs: list[DocstringPair],
    max_new_tokens: int,
    lora_scope: str | None,
    seed: int,
) -> RuleEval:
    """One sampled response per pair (a pair listed n times is sampled n times), judged."""
    completions = sample_completions(
        policy, tokenizer, [p.prompt for p in pairs], max_new_tokens, seed=seed,
        lora_scope=lora_scope,
    )  # fmt: skip
    texts = [text for text, _ in completions]
    scores = [
        body_score(text, finished, pair.prompt, pair.response)
        for (text, finished), pair in zip(completions, pairs, strict=True)
    ]
    parsed = [parse_share(text, finished) for text, finished in completions]
    return RuleEval(
        score=sum(scores) / len(scores),
        parse_share=sum(parsed) / len(parsed),
        distinct_share=len({t.strip() for t in texts}) / len(texts),
        mean_chars=sum(len(t) for t in texts) / len(texts),
        texts=texts,
    )


def ppo_time_limit(settings: DemoSettings, elapsed_s: float, rule_eval_s: float) -> float:
    """PPO's time limit (0 = none): ppo_budget_s, cut so that the run ends within
    total_budget_s. What follows PPO is one more rule evaluation (as long as the SFT policy's,
    rule_eval_s, just measured) and a held-out rollout, a save and the plot, which take about
    as long again: 2 x rule_eval_s is kept for them. At least one iteration always runs (the
    limit is checked after each), so there is a PPO policy to evaluate."""
    if not settings.total_budget_s:
        return settings.ppo_budget_s
    left = settings.total_budget_s - elapsed_s - 2 * rule_eval_s
    limit = min(settings.ppo_budget_s, left) if settings.ppo_budget_s else left
    return max(limit, 1e-3)


def run_demo(
    out_dir: str | Path,
    preset: str = "full",
    seed: int = 0,
    show_progress: bool = True,
    overwrite: bool = False,
    human: HumanLabeling | None = None,
) -> dict[str, Any]:
    """Run the pipeline into out_dir and return the summary (also in summary.json). With
    `human`, people rank the samples on the ranking page instead of the simulated labeler."""
    if preset not in SETTINGS:
        raise ValueError(f"unknown demo preset {preset!r}; choose from {sorted(SETTINGS)}")
    settings, out, tok = SETTINGS[preset], Path(out_dir), ByteTokenizer()
    claim_run_dir(out, DEMO_RUN_MARKERS, resume=False, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    began, timings = time.perf_counter(), {}

    def log(message: str) -> None:
        if show_progress:
            print(f"[demo {time.perf_counter() - began:6.0f}s] {message}", flush=True)

    # step 1. pretrain
    log("step 1/6: pretraining a tiny PaLM on the stdlib corpus")
    model_config = preset_config("tiny", tok.vocab_size, **settings.model_overrides)
    history = train_lm(
        model_config,
        TrainConfig(
            seq_len=256,
            batch_size=16,
            steps=settings.pretrain_steps,
            lr=2e-3,
            warmup_steps=min(50, settings.pretrain_steps // 2),
            eval_every=settings.pretrain_steps,
            eval_batches=8,
            sample_every=0,
            log_every=10,
            checkpoint_every=0,
            seed=seed,
            time_limit_s=settings.pretrain_budget_s,
        ),
        out / "pretrain",
        show_progress=show_progress,
        data="stdlib",
    )
    base_dir = TrainingCheckpoints(out / "pretrain" / "checkpoints").latest()
    timings["pretrain_s"] = time.perf_counter() - began

    # step 2. SFT on (signature + docstring) -> body demonstrations from the training files
    log("step 2/6: supervised fine-tuning on docstring -> body pairs")
    sft_pairs, label_pairs, eval_pairs = demo_prompts(settings, seed)
    train_prompts = [pair.prompt for pair in label_pairs]
    heldout_pairs = eval_pairs[: len(eval_pairs) // settings.eval_samples]
    heldout_prompts = [pair.prompt for pair in heldout_pairs]
    sft_data = out / "sft.jsonl"
    write_bytes_atomic(
        sft_data,
        "".join(json.dumps(asdict(pair)) + "\n" for pair in sft_pairs).encode(),
    )
    train_lm(
        None,
        TrainConfig(
            seq_len=256,
            batch_size=16,
            steps=settings.sft_steps,
            lr=1e-3,
            warmup_steps=min(10, settings.sft_steps // 2),
            eval_every=0,
            sample_every=0,
            log_every=10,
            checkpoint_every=0,
            seed=seed,
            time_limit_s=settings.sft_budget_s,
        ),
        out / "sft",
        init_checkpoint=base_dir,
        sft=True,
        show_progress=show_progress,
        data=str(sft_data),
    )
    sft_dir = TrainingCheckpoints(out / "sft" / "checkpoints").latest()
    timings["sft_s"] = time.perf_counter() - began - sum(timings.values())

    # step 3. labels for samples of the SFT policy (the simulated labeler, or people)
    log("step 3/6: sampling responses and ranking them")
    policy = PaLM.from_pretrained(sft_dir)
    k, new = settings.responses_per_prompt, settings.response_tokens
    if human is None:
        references = [pair.response for pair in label_pairs]
        groups = label_samples(policy, tok, train_prompts, k, new, seed=seed,
                               references=references)  # fmt: skip
        write_rankings(groups, out / "rankings.jsonl")
    else:
        groups = rank_by_people(policy, tok, train_prompts, k, new, seed, out, human)
    # Held-out accuracy is measured against the rule either way: with people ranking, it says
    # how far their preferences and the rule (the demo's yardstick) agree.
    repeats = settings.heldout_groups_per_prompt
    heldout_groups = label_samples(
        policy, tok, heldout_prompts * repeats, k, new, seed=seed + 1,
        references=[pair.response for pair in heldout_pairs] * repeats,
    )  # fmt: skip
    if len(groups) < 2:
        raise ValueError(
            f"only {len(groups)} rankings of {len(train_prompts)} prompts order anything; "
            + ("rank more" if human else "train longer (all samples tie)")
        )
    timings["label_s"] = time.perf_counter() - began - sum(timings.values())

    # step 4. reward model, trained on the rankings only
    log(f"step 4/6: training the reward model on {len(groups)} ranked groups")
    seq_len = 192
    train_reward(
        sft_dir,  # from the SFT model, as in InstructGPT
        out / "rankings.jsonl",
        TrainConfig(
            seq_len=seq_len,
            batch_size=8,
            steps=settings.reward_steps,
            lr=1e-3,
            warmup_steps=min(20, settings.reward_steps // 2),
            eval_every=settings.reward_steps,
            log_every=10,
            checkpoint_every=0,
            weight_decay=0.0,
            seed=seed,
            time_limit_s=settings.reward_budget_s,
        ),
        RewardConfig(lora_rank=16, lora_alpha=32),
        out / "reward",
        heldout_fraction=0.1,
        show_progress=show_progress,
    )
    reward_dir = TrainingCheckpoints(out / "reward" / "checkpoints").latest()
    reward_model = RewardModel.from_pretrained(reward_dir)
    rm_accuracy = (
        heldout_accuracy(reward_model, heldout_groups, tok, reward_model.max_row_len)
        if heldout_groups
        else float("nan")
    )
    timings["reward_s"] = time.perf_counter() - began - sum(timings.values())

    # step 5. PPO from the SFT policy (also its reference: adapters off)
    log(f"step 5/6: PPO against the reward model (held-out accuracy {rm_accuracy:.2f})")
    pretrained = PaLM.from_pretrained(base_dir)
    before = rule_eval(pretrained, tok, eval_pairs, new, None, seed + 2)
    evaluated = time.perf_counter()
    sft = rule_eval(policy, tok, eval_pairs, new, None, seed + 2)
    ppo_limit_s = ppo_time_limit(
        settings, time.perf_counter() - began, time.perf_counter() - evaluated
    )
    del pretrained
    trainer = PPOTrainer(
        policy,
        tok,
        train_prompts,
        reward_model=reward_model,
        config=PPOConfig(
            rollout_batch_size=16,
            minibatch_size=8,
            max_new_tokens=new,
            lr=1e-3,
            critic_lr=1e-3,
            # beta starts at 0.1 and adapts towards 6 nats per response (Ziegler et al.); the
            # short horizon lets it move within the demo's few hundred episodes. A fixed beta
            # let the KL climb past 10 nats by the last iteration.
            kl_coef=0.1,
            adaptive_kl=True,
            kl_target=6.0,
            kl_horizon=40,
            seed=seed,
        ),
        out_dir=out,
        show_progress=show_progress,
    )
    ppo_history = trainer.train(settings.ppo_iterations, time_limit_s=ppo_limit_s)
    timings["ppo_s"] = time.perf_counter() - began - sum(timings.values())

    # step 6. before/after on held-out prompts
    log("step 6/6: evaluating on held-out prompts")
    after = rule_eval(policy, tok, eval_pairs, new, "actor", seed + 2)
    policy.save_pretrained(out / "policy")  # with its "actor" adapter
    _, heldout_metrics, _ = trainer.rollout(heldout_prompts)
    curves = write_ppo_curves(
        ppo_history,
        out,
        kl_target=trainer.config.kl_target if trainer.config.adaptive_kl else None,
        title=f"palm-rlhf demo, seed {seed}: PPO against the learned reward model",
    )
    summary = {
        "preset": preset,
        "pretrain_eval_bpb": history[-1].get("eval_bpb"),
        "ranked_groups": len(groups),
        "labeler": "people (ranking page)"
        if human
        else "simulated (label/simulated.py body_score)",
        "reward_model_heldout_accuracy": rm_accuracy,
        "rule_score_before": before.score,
        "rule_score_sft": sft.score,
        "rule_score_after": after.score,
        "rule_score_ratio": after.score / before.score if before.score else float("nan"),
        "distinct_share": {
            "before": before.distinct_share,
            "sft": sft.distinct_share,
            "after": after.distinct_share,
        },
        "mean_chars": {
            "before": before.mean_chars,
            "sft": sft.mean_chars,
            "after": after.mean_chars,
        },
        # The earlier rule, which any short line that parses satisfies (the exploit lesson).
        "parse_share": {
            "before": before.parse_share,
            "sft": sft.parse_share,
            "after": after.parse_share,
        },
        "rule_eval_prompts": len(heldout_prompts),
        "rule_eval_samples": len(eval_pairs),
        "heldout_kl_to_reference": heldout_metrics["kl_ref"],
        "heldout_reward_score_after": heldout_metrics["score_mean"],
        # Steps each stage ran: fewer than asked means its time budget stopped it.
        "steps_run": {
            "pretrain": int(base_dir.name.removeprefix("step_")),
            "sft": int(sft_dir.name.removeprefix("step_")),
            "reward": int(reward_dir.name.removeprefix("step_")),
            "ppo": len(ppo_history),
        },
        "ppo_time_limit_s": round(ppo_limit_s, 1),
        "steps_asked": {
            "pretrain": settings.pretrain_steps,
            "sft": settings.sft_steps,
            "reward": settings.reward_steps,
            "ppo": settings.ppo_iterations,
        },
        "ppo_iterations": len(ppo_history),
        "ppo_curves_png": curves["png"],
        "ppo_curves_csv": curves["csv"],
        "ppo_curves_message": curves.get("message"),
        "samples": [
            {"prompt": p.prompt, "before": b, "after": a}
            for p, b, a in zip(eval_pairs[:3], before.texts, after.texts, strict=False)
        ],
        "seconds": {
            **{k: round(v, 1) for k, v in timings.items()},
            "total": round(time.perf_counter() - began, 1),
        },
        "ppo_config": asdict(trainer.config),
        "seed": seed,
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    write_bytes_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print("\n=== palm-rlhf demo ===")
    print(f"pretrained held-out bits/byte : {summary['pretrain_eval_bpb']:.3f}")
    print(
        f"reward model held-out accuracy: {summary['reward_model_heldout_accuracy']:.3f} "
        f"({summary['ranked_groups']} ranked groups)"
    )
    print(
        f"rule score pretrained -> SFT -> PPO: {summary['rule_score_before']:.3f} -> "
        f"{summary['rule_score_sft']:.3f} -> {summary['rule_score_after']:.3f}"
    )
    distinct, chars = summary["distinct_share"], summary["mean_chars"]
    print(
        f"distinct responses            : {distinct['before']:.0%} -> {distinct['sft']:.0%} -> "
        f"{distinct['after']:.0%}; mean length {chars['before']:.0f} -> {chars['sft']:.0f} -> "
        f"{chars['after']:.0f} characters"
    )
    print(f"KL to reference (held-out)    : {summary['heldout_kl_to_reference']:.3f} nats")
    for sample in summary["samples"]:
        print(
            f"\n--- prompt ---\n{sample['prompt']}--- before ---\n{sample['before']}\n"
            f"--- after ---\n{sample['after']}"
        )
    if summary["ppo_curves_png"] is None:
        print(f"\n{summary['ppo_curves_message']}")
    plot = summary["ppo_curves_png"] or summary["ppo_curves_csv"]
    print(f"\ncurves: {plot}; total {summary['seconds']['total']:.0f}s")


def cpu_name() -> str:
    """The CPU's model name (for measured figures: float bits and speed differ per CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
