"""`palm-rlhf sample` and `palm-rlhf label` (serve, `stats`, `export`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from ..data.preferences import AGGREGATE_CHOICES, describe_skipped, load_preferences, parse_ranking
from ..data.prompts import read_prompts
from ..data.rank_stats import summarise
from ..label.log import RankingLog, cut_torn_tail, read_log
from ..label.server import serve_until_done
from ..label.session import LabelSession
from ..label.tasks import MAX_RESPONSES, Task, append_tasks, load_tasks, sample_tasks, write_tasks
from ..model.palm import PaLM
from ..storage.atomic import write_bytes_atomic
from ..tokenizers.files import model_tokenizer


def add_sample_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--policy", type=Path, required=required, help="PaLM checkpoint (or run directory)"
    )
    parser.add_argument(
        "--prompts",
        default=None if not required else "stdlib",
        help="'stdlib', a text file (one prompt per line) or a .jsonl of {\"prompt\": ...} rows "
        "(other fields travel with the task) [stdlib]",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="with --prompts stdlib: how many [600]"
    )
    parser.add_argument("--k", type=int, default=4, help=f"responses per prompt, 2-{MAX_RESPONSES}")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per response")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch-size", type=int, default=64, help="rows sampled at once")
    parser.add_argument("--lora-scope", default=None, help="adapter scope to sample with")
    parser.add_argument("--device", default=None, help="torch device [cuda if available]")


def _load_policy(args: argparse.Namespace) -> tuple[Any, Any]:
    policy = PaLM.from_pretrained(args.policy)
    tokenizer = model_tokenizer(policy, str(args.policy))
    policy.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return policy, tokenizer


def _sample(args: argparse.Namespace, records: list[Any], first_index: int) -> list[Task]:
    policy, tokenizer = args.loaded_policy
    return sample_tasks(
        policy,
        tokenizer,
        records,
        args.k,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        policy_name=str(args.policy),
        lora_scope=args.lora_scope,
        first_index=first_index,
        show_progress=args.show_progress,
    )


def add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="sample K responses per prompt into a tasks file for labeling",
        description="Write tasks JSONL: K sampled responses per prompt (batched KV-cache "
        "generation), with the policy and generation settings recorded in every task. Rank "
        "them with `palm-rlhf label --tasks`.",
    )
    add_sample_options(parser, required=True)
    parser.add_argument("--out", type=Path, required=True, help="tasks JSONL to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(run=run_sample)


@torch.inference_mode()
def run_sample(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; give --overwrite to replace it")
    records = read_prompts(args.prompts, args.num_prompts, args.seed)
    args.loaded_policy, args.show_progress = _load_policy(args), True
    tasks = _sample(args, records, 0)
    write_tasks(tasks, args.out)
    print(f"wrote {len(tasks)} tasks of {args.k} responses to {args.out}")


def add_label_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "label",
        help="rank responses in the browser; `label stats` and `label export` read the result",
        description="Serve the ranking page on this machine and append every ranking to --out "
        "(the rankings JSONL `palm-rlhf reward --data` reads). Tasks come from --tasks (see "
        "`palm-rlhf sample`) or are sampled ahead of the labelers from --policy and --prompts.",
    )
    parser.add_argument("--tasks", type=Path, default=None, help="tasks JSONL to rank")
    parser.add_argument("--out", type=Path, default=None, help="rankings JSONL to append to")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind [127.0.0.1: this machine only]"
    )
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free one) [8765]")
    parser.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        help="a Host name the page may be reached by besides localhost (with --host 0.0.0.0); "
        "repeat for several",
    )
    parser.add_argument(
        "--per-task", type=int, default=1, help="distinct labelers each task is served to [1]"
    )
    parser.add_argument(
        "--target", type=int, default=None, help="stop once the log holds this many rankings"
    )
    add_sample_options(parser, required=False)
    actions = parser.add_subparsers(dest="label_action", metavar="{stats,export}")
    stats = actions.add_parser("stats", help="counts, time per task, agreement between labelers")
    stats.add_argument("rankings", type=Path, help="rankings JSONL written by `palm-rlhf label`")
    stats.add_argument(
        "--aggregate", choices=AGGREGATE_CHOICES[1:], default="ranked_pairs",
        help="how disagreeing rankings of a task are merged in the report [ranked_pairs]",
    )  # fmt: skip
    stats.add_argument("--json", action="store_true", help="print the report as JSON")
    export = actions.add_parser("export", help="write the rankings in another format")
    export.add_argument("rankings", type=Path, help="rankings JSONL written by `palm-rlhf label`")
    export.add_argument(
        "--to", choices=("pairs",), required=True,
        help='pairs: {"prompt", "chosen", "rejected"} rows, one per untied pair (TRL\'s format)',
    )  # fmt: skip
    export.add_argument("--out", dest="export_out", type=Path, required=True, help="file to write")
    export.add_argument(
        "--aggregate", choices=AGGREGATE_CHOICES, default="none",
        help="export every labeler's pairs (none) or one merged ranking per task [none]",
    )  # fmt: skip
    parser.set_defaults(run=run_label)


def run_label(args: argparse.Namespace) -> None:
    if args.label_action == "stats":
        return run_stats(args)
    if args.label_action == "export":
        return run_export(args)
    return serve(args)


def active_rows(path: Path) -> list[dict[str, Any]]:
    """The rankings log's ranking rows that were not undone, with their `ranks` parsed (None
    for a not-rankable row)."""

    rows = []
    for lineno, row in read_log(path):
        ranks = None
        if not row.get("not_rankable"):
            ranks = parse_ranking(f"{path}:{lineno}", row["ranking"], len(row["responses"]))
        rows.append({**row, "ranks": ranks})
    return rows


def run_stats(args: argparse.Namespace) -> None:
    report = summarise(active_rows(args.rankings), args.aggregate)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.rankings}: {report['tasks_ranked']} tasks ranked")
    print(f"{'labeler':<24}{'tasks':>8}{'median s/task':>16}{'total s':>10}")
    for name, row in report["labelers"].items():
        print(
            f"{name:<24}{row['tasks']:>8}{row['median_s_per_task']:>16.1f}{row['total_s']:>10.0f}"
        )
    several = report["tasks_ranked_more_than_once"]
    print(f"tasks ranked by more than one labeler: {several}")
    if several:
        agreement, tau = report["pairwise_agreement"], report["kendall_tau_b_mean"]
        print(
            f"pairwise agreement: {agreement:.3f} over {report['pairs_compared']} pairs; "
            f"mean Kendall tau-b: {'n/a' if math.isnan(tau) else f'{tau:.3f}'}"
        )
        for item in report["disagreements"]:
            print(
                f"  {item['task_id']}: {dict(zip(item['labelers'], item['rankings'], strict=True))}"
                f" -> {args.aggregate} {item[args.aggregate]}"
            )


def run_export(args: argparse.Namespace) -> None:
    data = load_preferences(args.rankings, args.aggregate)
    lines = []
    for group in data.groups:
        for i, better in enumerate(group.responses):
            for j, worse in enumerate(group.responses):
                if group.ranks[i] < group.ranks[j]:
                    row = {"prompt": group.prompt, "chosen": better, "rejected": worse}
                    lines.append(json.dumps(row, ensure_ascii=False))
    write_bytes_atomic(args.export_out, "".join(line + "\n" for line in lines).encode())
    skipped = describe_skipped(data.skipped) or "none"
    print(f"wrote {len(lines)} pairs from {len(data.groups)} rankings to {args.export_out} "
          f"(skipped: {skipped})")  # fmt: skip


def serve(args: argparse.Namespace) -> None:
    if args.out is None:
        raise ValueError("label needs --out rankings.jsonl (the log every ranking is added to)")
    if (args.tasks is None) == (args.policy is None):
        raise ValueError("give --tasks FILE, or --policy CKPT (with --prompts) to sample tasks")
    if args.policy is None:
        defaults = argparse.ArgumentParser()
        add_sample_options(defaults, required=False)
        given = [
            "--" + name.replace("_", "-")
            for name, default in vars(defaults.parse_args([])).items()
            if getattr(args, name) != default
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} only apply when sampling (--policy); --tasks gives the "
                "responses"
            )
    log = RankingLog(args.out)
    if log.repaired:
        print(f"warning: {log.repaired}", file=sys.stderr)
    sampler = None
    if args.tasks is not None:
        tasks = load_tasks(args.tasks)
        session = LabelSession(tasks, log, args.per_task, target=args.target)
    else:
        session, sampler = start_background_sampling(args, log)
    try:
        serve_until_done(
            session,
            args.host,
            args.port,
            allowed_hosts=tuple(args.allowed_hosts),
            announce=lambda line: print(line, flush=True),
        )
    finally:
        if sampler is not None:  # let it finish the chunk it is writing
            sampler.stop.set()
            sampler.join()
        log.close()
    print(f"stopped: {session.progress()['rankings']} rankings in {args.out}")


class BackgroundSampler(threading.Thread):
    """Samples tasks a chunk of prompts at a time and hands them to the session, so labelers
    start on the first chunk while the rest is sampled; the tasks are also appended to
    `<out>.tasks.jsonl`, and a restart reuses that file and samples only what is missing."""

    def __init__(self, args: argparse.Namespace, session: Any, records: list[Any], done: int):
        super().__init__(name="palm-rlhf-sampler", daemon=True)
        self.args, self.session, self.records, self.next_index = args, session, records, done
        self.stop = threading.Event()
        self.chunk = max(1, args.batch_size // args.k)

    def run(self) -> None:
        try:
            self._sample_all()
        finally:
            self.session.sampling = False

    def _sample_all(self) -> None:
        with torch.inference_mode():
            while self.next_index < len(self.records) and not self.stop.is_set():
                chunk = self.records[self.next_index : self.next_index + self.chunk]
                tasks = _sample(self.args, chunk, self.next_index)
                # In the file before any labeler can be served them, so a task that was
                # ranked is always in the file a restart reads.
                append_tasks(tasks, self.args.tasks_path)
                self.session.add_tasks(tasks)
                self.next_index += len(chunk)


def start_background_sampling(args: argparse.Namespace, log: Any) -> tuple[Any, Any]:
    records = read_prompts(args.prompts or "stdlib", args.num_prompts, args.seed)
    args.tasks_path = Path(f"{args.out}.tasks.jsonl")
    existing = []
    if args.tasks_path.exists():
        if cut_torn_tail(args.tasks_path):  # a kill mid-write: those tasks were never served
            print(f"warning: {args.tasks_path}: cut a torn last line", file=sys.stderr)
        if args.tasks_path.stat().st_size:
            existing = load_tasks(args.tasks_path)
    if len(existing) > len(records):
        raise ValueError(f"{args.tasks_path} holds more tasks than there are prompts")
    args.loaded_policy, args.show_progress = _load_policy(args), False
    session = LabelSession(existing, log, args.per_task, target=args.target)
    sampler = BackgroundSampler(args, session, records, len(existing))
    session.sampling = len(existing) < len(records)  # before the first request can ask
    sampler.start()
    print(f"sampling {len(records) - len(existing)} more tasks in the background "
          f"into {args.tasks_path}")  # fmt: skip
    return session, sampler
