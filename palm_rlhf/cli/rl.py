"""`palm-rlhf grpo` and `palm-rlhf dpo`, with the conventions of the other stages (accelerate,
--resume/--overwrite, one --option per config field, JSONL metrics, curves)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

from ..data.prompts import read_prompts
from ..model.lora import fold_policy_adapter
from ..model.palm import PaLM
from ..model.reward import RewardModel
from ..plot import write_ppo_curves
from ..rl.config import GRPOConfig, PPOConfig
from ..rl.grpo import GRPOTrainer
from ..rl.online import load_reward_model, reward_functions
from ..rl.ppo import PPOTrainer
from ..tokenizers.files import load_tokenizer
from ..training.config import DPOConfig
from ..training.dpo import train_dpo
from ..training.fsdp import saves_here
from ..training.runs import claim_run_dir, read_metrics
from .options import add_dataclass_options, add_run_options, dataclass_from_args, make_accelerator
from .stages import add_preference_stage_options, run_preference_stage

GRPO_RUN_MARKERS = (
    "grpo_metrics.jsonl",
    "grpo_samples.jsonl",
    "grpo_state",
    "policy",
    "grpo_curves.csv",
    "grpo_curves.png",
)


def load_reward_fn(spec: str) -> tuple[str, Any, float]:
    """'module:function[:weight]' (module importable, or a path to a .py file) -> (name,
    function, weight). The name, used in the metrics, is the function's."""
    parts = spec.split(":")
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            raise ValueError(f"--reward-fn {spec!r}: weight {parts[2]!r} is not a number") from None
        parts = parts[:2]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--reward-fn {spec!r}: expected module:function[:weight]")
    module_name, function_name = parts
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"--reward-fn {spec!r}: no such file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(path.stem, module)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(
                f"--reward-fn {spec!r}: cannot import {module_name} ({error})"
            ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--reward-fn {spec!r}: {module_name} has no function {function_name!r}")
    if not math.isfinite(weight):
        raise ValueError(f"--reward-fn {spec!r}: weight must be finite")
    return function_name, function, weight


def parse_reward_checkpoint(spec: str) -> tuple[Path, float]:
    """'CKPT[:weight]' -> (path, weight); a path that itself holds ':' needs an explicit weight."""
    head, _, tail = spec.rpartition(":")
    if head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def add_grpo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "grpo",
        help="critic-free RL: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++",
        description="Fine-tune a policy checkpoint with group-sampled, critic-free RL against "
        "Python reward functions and/or a reward model. Writes OUT/policy (the policy with its "
        "'actor' adapter; sample with generate --lora-scope actor), OUT/grpo_state (for "
        "--resume), OUT/grpo_metrics.jsonl, OUT/grpo_samples.jsonl and OUT/grpo_curves.csv "
        "(+ .png with matplotlib).",
    )
    parser.add_argument("--policy", required=True, type=Path, help="PaLM checkpoint or run dir")
    parser.add_argument(
        "--prompts",
        required=True,
        help="'stdlib', a text file (one prompt per line) or a .jsonl of {\"prompt\": ...} "
        "rows whose other fields reach the reward functions as keyword arguments",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="with --prompts stdlib: how many [600]"
    )
    parser.add_argument(
        "--reward-fn",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION[:WEIGHT]",
        help="a reward function fn(prompts, responses, **fields) -> scores; MODULE is "
        "importable or a path to a .py file; repeat to sum several, each times its weight",
    )
    parser.add_argument(
        "--reward",
        default=None,
        metavar="CKPT[:WEIGHT]",
        help="a reward model checkpoint (or run directory), alone or added to the functions",
    )
    parser.add_argument("--iterations", type=int, default=25, help="iterations in all")
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save OUT/grpo_state every N"
    )
    parser.add_argument(
        "--time-limit-s", type=float, default=0.0, help="stop (and save) after this long; 0 = none"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    add_run_options(parser, "continue from OUT/grpo_state")
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is present")
    add_dataclass_options(parser, GRPOConfig, "GRPO (GRPOConfig)")
    parser.set_defaults(run=run_grpo)


def run_grpo(args: argparse.Namespace) -> None:
    if args.iterations < 1 or args.checkpoint_every < 0 or args.time_limit_s < 0:
        raise ValueError("--iterations must be >= 1, --checkpoint-every and --time-limit-s >= 0")
    if not args.reward_fn and args.reward is None:
        raise ValueError("give at least one --reward-fn or a --reward model")
    # Everything that can be refused is checked before the run directory is touched.
    try:
        functions = reward_functions([load_reward_fn(spec) for spec in args.reward_fn])
    except ValueError as error:
        message = str(error)
        raise ValueError(
            message if "--reward-fn" in message else f"--reward-fn: {message}"
        ) from None
    config = dataclass_from_args(GRPOConfig, args)
    prompts = read_prompts(args.prompts, args.num_prompts, seed=config.seed)
    state_dir = args.out / "grpo_state"
    if args.resume and not (state_dir / "grpo_state.json").is_file():
        raise FileNotFoundError(f"--resume: {state_dir} holds no GRPO state (grpo_state.json)")
    reward_model, reward_weight, inputs = None, 1.0, [args.policy]
    if args.reward is not None:
        reward_path, reward_weight = parse_reward_checkpoint(args.reward)
        if not math.isfinite(reward_weight):
            raise ValueError(f"--reward {args.reward!r}: weight must be finite")
        inputs.append(reward_path)
    # As stored: the trainer keeps frozen weights so (or in --base-dtype) and trains in
    # float32; no float32 copy of a bf16 checkpoint is ever made.
    policy = PaLM.from_pretrained(args.policy)
    fold_policy_adapter(policy)  # a policy with several scopes is refused here, not later
    accelerator = make_accelerator(args, config.mixed_precision)
    if args.reward is not None:
        reward_model = load_shared_reward(reward_path, policy, args.policy, config, accelerator)
    claim_run_dir(args.out, GRPO_RUN_MARKERS, args.resume, args.overwrite, accelerator, inputs)
    trainer = GRPOTrainer(
        policy,
        load_tokenizer(policy.tokenizer_files),
        prompts,
        reward_model=reward_model,
        reward_model_weight=reward_weight,
        reward_fns=functions,
        config=config,
        accelerator=accelerator,
        out_dir=args.out,
        overwrite=args.overwrite,
    )
    run_online_stage(trainer, args, state_dir, "grpo")


def add_dpo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dpo",
        help="offline DPO / IPO / Plackett-Luce on preference JSONL",
        description="Train a policy directly on rankings, pairs or label-page logs (the files "
        "`reward` reads), with no reward model or sampling. OUT is a run directory that "
        "generate/ppo/grpo read as a policy (its adapter scope is 'dpo').",
    )
    add_preference_stage_options(
        parser,
        init_help="PaLM checkpoint (the SFT one)",
        heldout_help="share of prompts held out",
        train_title="training (TrainConfig; batch-size counts prompts)",
    )
    add_dataclass_options(parser, DPOConfig, "DPO (DPOConfig)")
    parser.set_defaults(run=run_dpo)


def run_dpo(args: argparse.Namespace) -> None:
    run_preference_stage(args, "dpo", train_dpo, DPOConfig)


def add_ppo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ppo",
        help="PPO fine-tuning against a reward model",
        description="Fine-tune a policy checkpoint with PPO against a reward model checkpoint. "
        "Writes OUT/policy (the policy with its 'actor' adapter; sample with generate "
        "--lora-scope actor), OUT/ppo_state (for --resume), OUT/ppo_metrics.jsonl and "
        "OUT/ppo_curves.csv (+ .png with matplotlib).",
    )
    parser.add_argument(
        "--policy", required=True, type=Path, help="PaLM checkpoint or run directory to start from"
    )
    parser.add_argument(
        "--reward", required=True, type=Path, help="reward model checkpoint or run directory"
    )
    parser.add_argument(
        "--prompts",
        default="stdlib",
        help="'stdlib' (source snippets), a text file with one prompt per line, or a .jsonl "
        'file of {"prompt": ...} rows (a prompt may span lines there)',
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="prompts drawn from the stdlib corpus [600]; only with --prompts stdlib",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=25,
        help="PPO iterations in all, like --steps: --resume continues up to this total",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="also save OUT/ppo_state every N iterations (0: only at the end)",
    )
    parser.add_argument(
        "--time-limit-s",
        type=float,
        default=0.0,
        help="stop (and save) after this many seconds of PPO; 0 = no limit",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    add_run_options(parser, "continue from OUT/ppo_state")
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is present")
    add_dataclass_options(parser, PPOConfig, "PPO (PPOConfig)")
    parser.set_defaults(run=run_ppo)


PPO_RUN_MARKERS = ("ppo_metrics.jsonl", "ppo_state", "policy", "ppo_curves.csv", "ppo_curves.png")


def prompt_texts(spec: str, num_prompts: int | None) -> list[str]:
    """--prompts: 'stdlib', a text file (one prompt per line) or JSONL ({"prompt": ...})."""
    return [record.prompt for record in read_prompts(spec, num_prompts)]


def run_ppo(args: argparse.Namespace) -> None:
    for name in ("iterations", "checkpoint_every"):
        if getattr(args, name) < (1 if name == "iterations" else 0):
            raise ValueError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
            )
    if args.time_limit_s < 0:
        raise ValueError(f"--time-limit-s must be >= 0, got {args.time_limit_s}")
    prompts = prompt_texts(args.prompts, args.num_prompts)
    state_dir = args.out / "ppo_state"
    if args.resume and not (state_dir / "ppo_state.json").is_file():
        raise FileNotFoundError(f"--resume: {state_dir} holds no PPO state (ppo_state.json)")
    config = dataclass_from_args(PPOConfig, args)
    accelerator = make_accelerator(args, config.mixed_precision)
    claim_run_dir(
        args.out,
        PPO_RUN_MARKERS,
        args.resume,
        args.overwrite,
        accelerator,
        inputs=(args.policy, args.reward),
    )
    policy = PaLM.from_pretrained(args.policy)  # as stored, like grpo's
    fold_policy_adapter(policy)  # a policy with several scopes is refused here, not later
    reward_model = load_shared_reward(args.reward, policy, args.policy, config, accelerator)
    trainer = PPOTrainer(
        policy,
        load_tokenizer(policy.tokenizer_files),
        prompts,
        reward_model=reward_model,
        config=config,
        accelerator=accelerator,
        out_dir=args.out,
        overwrite=args.overwrite,
    )
    run_online_stage(trainer, args, state_dir, "ppo")


def load_shared_reward(
    reward_dir: Path, policy: PaLM, policy_dir: Path, config: Any, accelerator: Any
) -> RewardModel:
    """`online.load_reward_model`: on the policy's own base when they share it, else on its own
    trunk with a printed notice of what that costs."""
    reward_model, notice = load_reward_model(
        reward_dir, policy, policy_dir, share_base=not config.full_finetune
    )
    if notice and accelerator.is_main_process:
        print(f"note: {notice}")
    return reward_model


def run_online_stage(trainer: Any, args: argparse.Namespace, state_dir: Path, stage: str) -> None:
    """The end `ppo` and `grpo` share: resume, train up to --iterations in all, save the state
    and OUT/policy, draw the curves and print the last iteration."""

    if args.resume:
        trainer.load(state_dir)
    remaining = args.iterations - trainer.iteration
    if remaining <= 0:
        print(f"nothing to do: {state_dir} is at iteration {trainer.iteration} >= --iterations")
        return
    trainer.train(
        remaining,
        time_limit_s=args.time_limit_s,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=state_dir,
    )
    trainer.save(state_dir)
    accelerator = trainer.accelerator
    if saves_here(trainer.policy.state_dict().values(), accelerator):
        # The policy alone: its actor scope, not the critic and reward scopes that may share
        # its base.
        actor = [trainer.actor_scope] if trainer.actor_scope is not None else []
        main = accelerator.is_main_process
        trainer.policy.save_pretrained(args.out / "policy", scopes=actor, write=main)
    if accelerator.is_main_process:
        history = read_metrics(args.out / f"{stage}_metrics.jsonl")
        plots = write_ppo_curves(history, args.out, title=f"palm-rlhf {stage}", stage=stage)
        last = history[-1]
        print(
            f"done: iteration {last['iteration']}, score_mean={last['score_mean']:.4g}, "
            f"kl_ref={last['kl_ref']:.4g}; processes={accelerator.num_processes}; "
            f"policy in {args.out / 'policy'}; curves in {plots['png'] or plots['csv']}"
        )
        if plots.get("message"):
            print(plots["message"])
