"""`palm-rlhf pretrain`, `sft`, `reward`, `generate` and `score`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import PRESETS, PaLMConfig, preset_config
from ..data.preferences import AGGREGATE_CHOICES, encode_reward_rows
from ..generation import generate
from ..model.palm import PaLM
from ..model.reward import RewardConfig, RewardModel
from ..tokenizers.base import ByteTokenizer, encode_prompt, stop_ids
from ..tokenizers.files import load_tokenizer, model_tokenizer, read_tokenizer_files
from ..training.config import TrainConfig
from ..training.lm import train_lm
from ..training.reward import NOT_FOR_REWARD, train_reward
from .options import (
    add_dataclass_options,
    add_run_options,
    dataclass_from_args,
    given_options,
    make_accelerator,
    print_done,
)


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
        "--data",
        default=None,
        help='a JSONL of {"prompt", "response"} pairs (required)'
        if sft
        else "corpus: 'stdlib' (this Python's standard library), a text file, a folder of text "
        "files, a .gz file or a .jsonl file (its --jsonl-field) [stdlib]",
    )
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
        data=args.data or "stdlib",
    )
    if history:
        print_done(history[-1], args.out, accelerator)


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
    run_preference_stage(args, "reward", train_reward, RewardConfig)


def add_preference_stage_options(
    parser: argparse.ArgumentParser, init_help: str, heldout_help: str, train_title: str
) -> None:
    """The options `reward` and `dpo` share: both train from a PaLM checkpoint on a preference
    JSONL (--data), split by prompt and optionally aggregated."""
    parser.add_argument("--init", required=True, type=Path, help=init_help)
    parser.add_argument(
        "--data",
        default=None,
        help="preference JSONL: rankings, pairs or ratings, or a label-page log (required)",
    )
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
    train_config = dataclass_from_args(TrainConfig, args, skip=NOT_FOR_REWARD)
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
    if history:
        print_done(history[-1], args.out, accelerator)


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
    model = RewardModel.from_pretrained(args.checkpoint).eval()
    tokenizer = load_tokenizer(model.trunk.tokenizer_files)
    prompt = tokenizer.encode(args.prompt)
    pairs = [(prompt, tokenizer.encode(response)) for response in args.response]
    tokens, mask = encode_reward_rows(tokenizer, pairs, model.max_row_len)
    scores = model(tokens, mask, normalized=not args.raw)
    for response, score in zip(args.response, scores.tolist(), strict=True):
        print(f"{score:+.4f}\t{response!r}")
