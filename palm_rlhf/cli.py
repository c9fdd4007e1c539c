"""The `palm-rlhf` command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .chat import add_chat_parser
from .config import PRESETS, PaLMConfig, TrainConfig, field_docs, preset_config
from .generation import generate
from .hf.cli import add_export_parser, add_import_parser
from .label.cli import add_label_parser, add_sample_parser
from .palm import PaLM
from .preferences import AGGREGATE_CHOICES
from .rl.cli import add_dpo_parser, add_grpo_parser
from .tokenizer import (
    ByteTokenizer,
    encode_prompt,
    load_tokenizer,
    model_tokenizer,
    read_tokenizer_files,
    stop_ids,
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    skip: Sequence[str] = (),
    defaults_from_preset: bool = False,
) -> None:
    """One --option per dataclass field, typed from its default, documented by its docstring."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default
        help_text = docs.get(field.name, "")
        if defaults_from_preset:
            help_text += " (default: from --preset)"
        else:
            help_text += f" (default: {default})"
        group.add_argument(
            _flag(field.name),
            dest=field.name,
            default=None,
            type=_option_type(field),
            help=help_text,
        )


def _option_type(field: dataclasses.Field) -> Any:
    """The argparse type of a config field: from its default, or from its annotation where
    the default (None, an empty tuple) does not say. Tuples are given comma-separated."""
    annotation = str(field.type)
    if annotation == "tuple[str, ...]":
        return lambda text: tuple(item.strip() for item in text.split(","))
    if annotation == "tuple[bool, ...]":
        return lambda text: tuple(_parse_bool(item.strip()) for item in text.split(","))
    if annotation == "int | None" or field.default is dataclasses.MISSING:
        return int
    if annotation == "float | None":
        return float
    kind = type(field.default)
    if kind not in (bool, int, float, str):
        raise TypeError(f"{field.name}: no command-line type for {annotation}")
    return _parse_bool if kind is bool else kind


def given_options(cls: type, args: argparse.Namespace, skip: Sequence[str] = ()) -> list[str]:
    """The --flags of `cls`'s fields that the user actually gave (each defaults to None)."""
    return [
        _flag(field.name)
        for field in dataclasses.fields(cls)
        if field.name not in skip and getattr(args, field.name, None) is not None
    ]


def make_accelerator(args: argparse.Namespace, mixed_precision: str = "no") -> Any:
    """The one Accelerator a subcommand runs under (--cpu, the precision, --log-with).

    Launched as several processes on a machine without CUDA, the processes join on the CPU
    even without --cpu: otherwise each would set up a world of one and train alone, all of
    them writing into the same --out.
    """
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=args.cpu or (launched > 1 and not torch.cuda.is_available()),
        mixed_precision=mixed_precision,
        log_with=getattr(args, "log_with", None),
        project_dir=str(args.out),
    )
    if accelerator.num_processes != launched:
        raise ValueError(
            f"launched as {launched} processes, but accelerate set up a world of "
            f"{accelerator.num_processes}; check the launch config (see examples/accelerate)"
        )
    return accelerator


def add_run_options(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """--resume / --overwrite, the same on every stage that writes a run directory."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in --out even if it holds one (its metrics and checkpoints "
        "are deleted); without it (or --resume) such a run is refused",
    )


def dataclass_from_args(cls: type, args: argparse.Namespace, **base: Any) -> Any:
    """`cls` from `base` and the flags given; a field the config refuses is named by its flag."""
    values = dict(base)
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    try:
        return cls(**values)
    except ValueError as error:
        field, _, reason = str(error).partition(": ")
        if field in values and hasattr(args, field):  # a value that came with a flag
            raise ValueError(f"{_flag(field)}: {reason}") from None
        raise


def print_done(last: dict[str, Any], out: Path, num_processes: int = 1) -> None:
    summary = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()
    )
    print(f"done: {summary}; processes={num_processes}; checkpoints in {out / 'checkpoints'}")


def add_train_parser(subparsers: argparse._SubParsersAction, name: str) -> None:
    sft = name == "sft"
    parser = subparsers.add_parser(
        name,
        help="supervised fine-tuning on prompt/response JSONL" if sft else "pretrain a PaLM",
        description=(
            'Fine-tune on a JSONL of {"prompt", "response"}; the loss counts response tokens only.'
            if sft
            else "Pretrain a PaLM on the built-in stdlib corpus or local text files."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model size for a fresh model [tiny] (PaLMConfig overrides below win); not with "
        "--init, whose checkpoint fixes the architecture",
    )
    add_run_options(parser, "continue from the latest checkpoint in --out")
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint's weights and architecture"
        + (" (required)" if sft else ""),
        required=sft,
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a fresh model's tokenizer: a directory with a Hugging Face tokenizer.json (and "
        "tokenizer_config.json); saved with every checkpoint [the byte tokenizer]; not with "
        "--init, whose checkpoint brings its own",
    )
    parser.add_argument(
        "--log-with", default=None, help="accelerate tracker, e.g. tensorboard or wandb"
    )
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is present")
    add_dataclass_options(parser, TrainConfig, "training (TrainConfig)")
    add_dataclass_options(
        parser,
        PaLMConfig,
        "model (PaLMConfig; fresh models only, not with --init)",
        skip=("num_tokens",),
        defaults_from_preset=True,
    )
    parser.set_defaults(run=run_train, sft=sft)


def run_train(args: argparse.Namespace) -> None:
    from .train_lm import train_lm

    train_config = dataclass_from_args(TrainConfig, args)
    if args.sft and args.data is None:
        raise ValueError("sft needs --data PATH to a JSONL of prompt/response pairs")
    model_config, tokenizer = None, None
    if args.init is not None:
        ignored = given_options(PaLMConfig, args, skip=("num_tokens",))
        ignored += ["--preset"] if args.preset is not None else []
        ignored += ["--tokenizer"] if args.tokenizer is not None else []
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)}: the architecture and tokenizer come from the --init "
                "checkpoint; leave the model options out"
            )
    else:
        tokenizer = ByteTokenizer()
        if args.tokenizer is not None:
            files = read_tokenizer_files(args.tokenizer)
            if "tokenizer.json" not in files:
                raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
            tokenizer = load_tokenizer(files)
        base = preset_config(args.preset or "tiny", tokenizer.vocab_size)
        model_config = dataclass_from_args(PaLMConfig, args, **dataclasses.asdict(base))
    accelerator = make_accelerator(args, train_config.mixed_precision)
    history = train_lm(
        model_config,
        train_config,
        args.out,
        resume=args.resume,
        init_checkpoint=args.init,
        sft=args.sft,
        accelerator=accelerator,
        tokenizer=tokenizer,
        log_with=args.log_with,
        overwrite=args.overwrite,
    )
    if accelerator.is_main_process and history:
        print_done(history[-1], args.out, accelerator.num_processes)


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Sample continuations of one or more prompts from a saved PaLM checkpoint.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint directory, or a run directory (uses its latest checkpoint)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt text; repeat the flag for a batch of prompts",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="most tokens to sample per prompt"
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--lora-scope", default=None, help="adapter scope to apply, if any")
    parser.add_argument(
        "--device",
        default=None,
        help="torch device to sample on, e.g. cpu or cuda [cuda if available, else cpu]",
    )
    parser.set_defaults(run=run_generate)


@torch.inference_mode()
def run_generate(args: argparse.Namespace) -> None:
    model = PaLM.from_pretrained(args.checkpoint)
    tokenizer = model_tokenizer(model, str(args.checkpoint))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    prompts = [encode_prompt(tokenizer, p) for p in args.prompt]
    out = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=stop_ids(tokenizer),
        pad_id=tokenizer.pad_id,
        seed=args.seed,
        lora_scope=args.lora_scope,
    )
    for prompt, tokens, mask in zip(args.prompt, out.tokens, out.mask, strict=True):
        print(prompt + tokenizer.decode(tokens[mask]))
        print("-" * 40)


def add_reward_parser(subparsers: argparse._SubParsersAction) -> None:
    from .reward import RewardConfig

    parser = subparsers.add_parser(
        "reward",
        help="train a reward model on rankings, pairs or ratings",
        description="Train a reward model (a PaLM trunk + scalar head) on preference JSONL: "
        'rankings {"prompt", "responses", "ranking"}, pairs {"prompt", "chosen", "rejected"} '
        'or ratings {"prompt", "response", "rating"}. Held-out pairwise accuracy is logged.',
    )
    add_preference_stage_options(
        parser,
        init_help="PaLM checkpoint (or run directory) to initialise the trunk from",
        heldout_help="share of prompts held out for eval_accuracy",
        train_title="training (TrainConfig)",
    )
    # max_seq_len is not an option: the loop records --seq-len there.
    add_dataclass_options(
        parser, RewardConfig, "reward model (RewardConfig)", skip=("max_seq_len",)
    )
    parser.set_defaults(run=run_reward)


def run_reward(args: argparse.Namespace) -> None:
    from .reward import RewardConfig
    from .train_reward import train_reward

    run_preference_stage(args, "reward", train_reward, RewardConfig)


def add_preference_stage_options(
    parser: argparse.ArgumentParser, init_help: str, heldout_help: str, train_title: str
) -> None:
    """The options `reward` and `dpo` share: both train from a PaLM checkpoint on a preference
    JSONL (--data, a TrainConfig field), split by prompt and optionally aggregated."""
    from .train_reward import NOT_FOR_REWARD

    parser.add_argument("--init", required=True, type=Path, help=init_help)
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    add_run_options(parser, "continue from the latest checkpoint in --out")
    parser.add_argument("--heldout-fraction", type=float, default=0.1, help=heldout_help)
    parser.add_argument(
        "--aggregate",
        choices=AGGREGATE_CHOICES,
        default="none",
        help="rankings log with several labelers per task: train every labeler's row (none) "
        "or one merged ranking per task (borda, ranked_pairs) [none]",
    )
    parser.add_argument("--log-with", default=None, help="accelerate tracker")
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is present")
    add_dataclass_options(parser, TrainConfig, train_title, skip=NOT_FOR_REWARD)


def run_preference_stage(
    args: argparse.Namespace, name: str, train: Any, stage_config_class: type
) -> None:
    """`reward` and `dpo`: build the configs from the flags and run `train` (train_reward or
    train_dpo, which take the same arguments) under the accelerator."""
    if args.data is None:
        raise ValueError(f"{name} needs --data PATH to a preference JSONL")
    train_config = dataclass_from_args(TrainConfig, args)
    stage_config = dataclass_from_args(stage_config_class, args)
    accelerator = make_accelerator(args, train_config.mixed_precision)
    history = train(
        args.init,
        args.data,
        train_config,
        stage_config,
        args.out,
        resume=args.resume,
        heldout_fraction=args.heldout_fraction,
        aggregate=args.aggregate,
        accelerator=accelerator,
        log_with=args.log_with,
        overwrite=args.overwrite,
    )
    if accelerator.is_main_process and history:
        print_done(history[-1], args.out, accelerator.num_processes)


def add_score_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score responses with a reward model",
        description="Print the reward model's score of each --response to --prompt.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a reward checkpoint directory, or a reward run directory",
    )
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument(
        "--response",
        action="append",
        required=True,
        help="response text; repeat the flag to score several",
    )
    parser.add_argument(
        "--raw", action="store_true", help="print raw scores instead of normalised ones"
    )
    parser.set_defaults(run=run_score)


@torch.inference_mode()
def run_score(args: argparse.Namespace) -> None:
    from .preferences import encode_reward_rows
    from .reward import RewardModel

    model = RewardModel.from_pretrained(args.checkpoint).eval()
    tokenizer = load_tokenizer(model.trunk.tokenizer_files)
    prompt = tokenizer.encode(args.prompt)
    pairs = [(prompt, tokenizer.encode(response)) for response in args.response]
    tokens, mask = encode_reward_rows(tokenizer, pairs, model.max_row_len)
    scores = model(tokens, mask, normalized=not args.raw)
    for response, score in zip(args.response, scores.tolist(), strict=True):
        print(f"{score:+.4f}\t{response!r}")


def add_ppo_parser(subparsers: argparse._SubParsersAction) -> None:
    from .config import PPOConfig

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


def read_prompts(spec: str, num_prompts: int | None) -> list[str]:
    """--prompts: 'stdlib', a text file (one prompt per line) or JSONL ({"prompt": ...})."""
    from .prompts import read_prompts as read_prompt_records

    return [record.prompt for record in read_prompt_records(spec, num_prompts)]


def run_ppo(args: argparse.Namespace) -> None:
    from .config import PPOConfig
    from .reward import RewardModel
    from .rl.ppo import PPOTrainer
    from .runs import claim_run_dir

    for name in ("iterations", "checkpoint_every"):
        if getattr(args, name) < (1 if name == "iterations" else 0):
            raise ValueError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
            )
    if args.time_limit_s < 0:
        raise ValueError(f"--time-limit-s must be >= 0, got {args.time_limit_s}")
    prompts = read_prompts(args.prompts, args.num_prompts)
    state_dir = args.out / "ppo_state"
    if args.resume and not (state_dir / "ppo_state.json").is_file():
        raise FileNotFoundError(f"--resume: {state_dir} holds no PPO state (ppo_state.json)")
    accelerator = make_accelerator(args)
    claim_run_dir(
        args.out,
        PPO_RUN_MARKERS,
        args.resume,
        args.overwrite,
        accelerator,
        inputs=(args.policy, args.reward),
    )
    policy = PaLM.from_pretrained(args.policy, dtype=torch.float32)
    trainer = PPOTrainer(
        policy,
        load_tokenizer(policy.tokenizer_files),
        prompts,
        reward_model=RewardModel.from_pretrained(args.reward, dtype=torch.float32),
        config=dataclass_from_args(PPOConfig, args),
        accelerator=accelerator,
        out_dir=args.out,
        overwrite=args.overwrite,
    )
    run_online_stage(trainer, args, state_dir, "ppo")


def run_online_stage(trainer: Any, args: argparse.Namespace, state_dir: Path, stage: str) -> None:
    """The end `ppo` and `grpo` share: resume, train up to --iterations in all, save the state
    and OUT/policy, draw the curves and print the last iteration."""
    from .plot import write_ppo_curves
    from .runs import read_metrics

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
    if accelerator.is_main_process:
        trainer.policy.save_pretrained(args.out / "policy")
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


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole RLHF pipeline on the built-in corpus",
        description="Pretrain a tiny PaLM on the stdlib corpus, fine-tune it on docstring -> "
        "body pairs (SFT), rank its samples with a simulated labeler (or people, --human), "
        "train a reward model on the rankings, run PPO against it, and report the rule score "
        "after pretraining, SFT and PPO on held-out files' prompts (about 13 minutes on 2 CPU "
        "cores; --smoke takes seconds).",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="run again into an --out that holds an earlier demo (its runs are deleted)",
    )
    human = parser.add_argument_group("people instead of the simulated labeler")
    human.add_argument(
        "--human",
        action="store_true",
        help="pause at the labeling stage and serve the ranking page; continue when a labeler "
        "presses 'Done labeling' (or --label-target rankings are in)",
    )
    human.add_argument("--label-host", default=None, help="interface to serve on [127.0.0.1]")
    human.add_argument("--label-port", type=int, default=None, help="port [8765]")
    human.add_argument(
        "--label-target", type=int, default=None, help="continue after this many rankings"
    )
    parser.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> None:
    from .demo import print_summary, run_demo
    from .label.human import HumanLabeling

    given = [
        flag
        for flag, value in (
            ("--label-host", args.label_host),
            ("--label-port", args.label_port),
            ("--label-target", args.label_target),
        )
        if value is not None
    ]
    if given and not args.human:
        raise ValueError(f"{', '.join(given)} only apply with --human")
    human = None
    if args.human:
        defaults = HumanLabeling()
        human = HumanLabeling(
            host=args.label_host or defaults.host,
            port=defaults.port if args.label_port is None else args.label_port,
            target=args.label_target,
        )
    summary = run_demo(
        args.out,
        "smoke" if args.smoke else "full",
        args.seed,
        overwrite=args.overwrite,
        human=human,
    )
    print_summary(summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palm-rlhf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers, "pretrain")
    add_train_parser(subparsers, "sft")
    add_generate_parser(subparsers)
    add_reward_parser(subparsers)
    add_score_parser(subparsers)
    add_ppo_parser(subparsers)
    add_grpo_parser(subparsers)
    add_dpo_parser(subparsers)
    add_demo_parser(subparsers)
    add_sample_parser(subparsers)
    add_label_parser(subparsers)
    add_chat_parser(subparsers)
    add_import_parser(subparsers)
    add_export_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"palm-rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
