"""`palm-rlhf demo`: the whole pipeline on the built-in corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import print_summary, run_demo
from ..label.human import HumanLabeling


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
