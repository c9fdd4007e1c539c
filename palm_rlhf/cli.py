"""The `palm-rlhf` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, PaLMConfig, TrainConfig, field_docs, preset_config
from .generation import generate
from .palm import PaLM
from .tokenizer import ByteTokenizer


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
        kind = type(default) if default is not dataclasses.MISSING else int
        help_text = docs.get(field.name, "")
        if defaults_from_preset:
            help_text += " (default: from --preset)"
        else:
            help_text += f" (default: {default})"
        group.add_argument(
            _flag(field.name),
            dest=field.name,
            default=None,
            type=_parse_bool if kind is bool else kind,
            help=help_text,
        )


def dataclass_from_args(cls: type, args: argparse.Namespace, **base: Any) -> Any:
    values = dict(base)
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    return cls(**values)


def print_done(last: dict[str, Any], out: Path) -> None:
    summary = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()
    )
    print(f"done: {summary}; checkpoints in {out / 'checkpoints'}")


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
        default="tiny",
        help="model size (PaLMConfig overrides below win)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint's weights" + (" (required)" if sft else ""),
        required=sft,
    )
    parser.add_argument(
        "--log-with", default=None, help="accelerate tracker, e.g. tensorboard or wandb"
    )
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is present")
    add_dataclass_options(parser, TrainConfig, "training (TrainConfig)")
    add_dataclass_options(
        parser, PaLMConfig, "model (PaLMConfig)", skip=("num_tokens",), defaults_from_preset=True
    )
    parser.set_defaults(run=run_train, sft=sft)


def run_train(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from .train_lm import train_lm

    tokenizer = ByteTokenizer()
    base = preset_config(args.preset, tokenizer.vocab_size)
    model_config = dataclass_from_args(PaLMConfig, args, **dataclasses.asdict(base))
    train_config = dataclass_from_args(TrainConfig, args)
    if args.sft and args.data is None:
        raise ValueError("sft needs --data PATH to a JSONL of prompt/response pairs")
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=train_config.mixed_precision,
        log_with=args.log_with,
        project_dir=str(args.out),
    )
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
    )
    if accelerator.is_main_process and history:
        print_done(history[-1], args.out)


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
    parser.set_defaults(run=run_generate)


@torch.inference_mode()
def run_generate(args: argparse.Namespace) -> None:
    tokenizer = ByteTokenizer()
    model = PaLM.from_pretrained(args.checkpoint)
    if model.config.num_tokens != tokenizer.vocab_size:
        raise ValueError(
            f"{args.checkpoint}: model has {model.config.num_tokens} tokens, the "
            f"byte tokenizer needs {tokenizer.vocab_size}"
        )
    prompts = [tokenizer.encode(p, add_bos=True) for p in args.prompt]
    out = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=tokenizer.eos_id,
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
    parser.add_argument(
        "--init",
        required=True,
        type=Path,
        help="PaLM checkpoint (or run directory) to initialise the trunk from",
    )
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="share of prompts held out for eval_accuracy",
    )
    parser.add_argument("--log-with", default=None, help="accelerate tracker")
    parser.add_argument("--cpu", action="store_true", help="force CPU even if a GPU is present")
    add_dataclass_options(parser, TrainConfig, "training (TrainConfig)")
    add_dataclass_options(parser, RewardConfig, "reward model (RewardConfig)")
    parser.set_defaults(run=run_reward)


def run_reward(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from .reward import RewardConfig
    from .train_reward import train_reward

    if args.data is None:
        raise ValueError("reward needs --data PATH to a preference JSONL")
    train_config = dataclass_from_args(TrainConfig, args)
    reward_config = dataclass_from_args(RewardConfig, args)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=train_config.mixed_precision,
        log_with=args.log_with,
        project_dir=str(args.out),
    )
    history = train_reward(
        args.init,
        args.data,
        train_config,
        reward_config,
        args.out,
        resume=args.resume,
        heldout_fraction=args.heldout_fraction,
        accelerator=accelerator,
        log_with=args.log_with,
    )
    if accelerator.is_main_process and history:
        print_done(history[-1], args.out)


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
    from .preferences import encode_completion
    from .reward import RewardModel
    from .tokenizer import pad_sequences

    tokenizer = ByteTokenizer()
    model = RewardModel.from_pretrained(args.checkpoint).eval()
    prompt, limit = tokenizer.encode(args.prompt), model.trunk.config.max_seq_len
    rows = [encode_completion(tokenizer, prompt, tokenizer.encode(r), limit) for r in args.response]
    tokens, mask = pad_sequences(rows, tokenizer.pad_id, "right")
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
        "--lora-scope actor), OUT/ppo_state (for --resume) and OUT/ppo_metrics.jsonl.",
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
        help="'stdlib' (source snippets) or a text file with one prompt per line",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=600, help="prompts drawn from the stdlib corpus"
    )
    parser.add_argument("--iterations", type=int, default=25, help="PPO iterations")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/ppo_state")
    add_dataclass_options(parser, PPOConfig, "PPO (PPOConfig)")
    parser.set_defaults(run=run_ppo)


def run_ppo(args: argparse.Namespace) -> None:
    from .config import PPOConfig
    from .labeler import stdlib_prompts
    from .ppo import PPOTrainer
    from .reward import RewardModel

    if args.prompts == "stdlib":
        prompts = stdlib_prompts(args.num_prompts, "train")
    else:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such prompts file")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path}: no prompts (every line is empty)")
    policy = PaLM.from_pretrained(args.policy)
    reward_model = RewardModel.from_pretrained(args.reward)
    trainer = PPOTrainer(
        policy,
        ByteTokenizer(),
        prompts,
        reward_model=reward_model,
        config=dataclass_from_args(PPOConfig, args),
        out_dir=args.out,
    )
    if args.resume:
        trainer.load(args.out / "ppo_state")
    history = trainer.train(args.iterations)
    trainer.save(args.out / "ppo_state")
    policy.save_pretrained(args.out / "policy")
    last = history[-1]
    print(
        f"done: iteration {last['iteration']}, score_mean={last['score_mean']:.4g}, "
        f"kl_ref={last['kl_ref']:.4g}; policy in {args.out / 'policy'}"
    )


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole RLHF pipeline on the built-in corpus",
        description="Pretrain a tiny PaLM on the stdlib corpus, rank its samples with a "
        "simulated labeler, train a reward model on the rankings, run PPO against it, and "
        "report before/after figures on held-out prompts (about 15 minutes on 2 CPU cores; "
        "--smoke takes seconds).",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.set_defaults(run=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> None:
    from .demo import print_summary, run_demo

    summary = run_demo(args.out, "smoke" if args.smoke else "full", args.seed)
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
    add_demo_parser(subparsers)
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
