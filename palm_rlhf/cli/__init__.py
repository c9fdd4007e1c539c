"""The `palm-rlhf` command line: one subcommand per stage, its options built from the stage's
config dataclass. Each stage's parser and runner live in the module named for it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .chat import add_chat_parser
from .demo import add_demo_parser
from .hf import add_export_parser, add_import_parser
from .label import add_label_parser, add_sample_parser
from .plan import add_plan_parser
from .rl import add_dpo_parser, add_grpo_parser, add_ppo_parser
from .stages import add_generate_parser, add_reward_parser, add_score_parser, add_train_parser


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
    add_plan_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"palm-rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
