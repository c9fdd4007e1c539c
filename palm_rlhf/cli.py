"""The `palm-rlhf` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .generation import generate
from .palm import PaLM
from .tokenizer import ByteTokenizer


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Sample continuations of one or more prompts from a saved PaLM checkpoint.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="directory written by save_pretrained / pretrain"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palm-rlhf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with torch.inference_mode():
            args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"palm-rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
