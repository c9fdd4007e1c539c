"""Throughput and latency of the ranking server under concurrent labelers.

No peer ships a comparable local ranking server (TRL, OpenRLHF and palm-rlhf-pytorch have none;
Open-Assistant, Argilla and Label Studio are server stacks), so this reports absolute figures
with the machine named, as the issue asks.

The load: `--clients` threads (default 8), each a labeler over its own keep-alive-less HTTP
connections, each doing `--submissions` (default 50) rounds of GET /api/next then POST
/api/submit against one server in this process. Every submission is fsynced before its reply,
so the figure is bounded by the disk's fsync latency. Reported: submissions/s over the whole
run, and p50/p99 latency of the submit calls; `--repeats` runs (default 3), medians.

    python benchmarks/bench_label.py [--clients 8] [--submissions 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from palm_rlhf.demo import cpu_name
from palm_rlhf.label.log import RankingLog
from palm_rlhf.label.server import LabelServer
from palm_rlhf.label.session import LabelSession
from palm_rlhf.label.tasks import Task


def call(port: int, method: str, path: str, body: dict | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Host": f"127.0.0.1:{port}", "Authorization": "Bearer bench"}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {payload}")
    return payload


def labeler(port: int, name: str, count: int) -> list[float]:
    latencies = []
    for i in range(count):
        task = call(port, "GET", f"/api/next?labeler={name}")["task"]
        body = {
            "submission_id": f"{name}-{i}",
            "task_id": task["task_id"],
            "labeler": name,
            "ranking": [0, [1, 2], 3],
            "not_rankable": False,
            "flags": [[], [], [], []],
            "duration_s": 1.0,
        }
        began = time.perf_counter()
        call(port, "POST", "/api/submit", body)
        latencies.append(time.perf_counter() - began)
    return latencies


def run_once(clients: int, submissions: int, directory: Path) -> dict[str, float]:
    tasks = [
        Task(f"t{i}", f"prompt {i}\n", [f"response {i}.{j}\n" * 3 for j in range(4)], [True] * 4)
        for i in range(clients * submissions)
    ]
    log = RankingLog(directory / f"rankings-{time.monotonic_ns()}.jsonl")
    server = LabelServer(LabelSession(tasks, log), port=0, token="bench")
    server.serve_in_thread()
    try:
        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            runs = list(
                pool.map(lambda n: labeler(server.port, f"lab{n}", submissions), range(clients))
            )
        wall = time.perf_counter() - began
    finally:
        server.shutdown()
        server.server_close()
        log.close()
    latencies = sorted(sum(runs, []))
    assert len(log.active_rankings()) == clients * submissions
    return {
        "submissions_per_s": len(latencies) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--submissions", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the logs go [a temp dir]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        runs = [run_once(args.clients, args.submissions, directory) for _ in range(args.repeats)]
    print(f"machine: {cpu_name()}, Python {platform.python_version()}, log in {directory}")
    print(f"load: {args.clients} clients x {args.submissions} submissions, {args.repeats} runs")
    for key in ("submissions_per_s", "p50_ms", "p99_ms"):
        values = [run[key] for run in runs]
        print(
            f"{key:>18}: median {statistics.median(values):8.1f}  "
            f"(range {min(values):.1f}..{max(values):.1f})"
        )


if __name__ == "__main__":
    main()
