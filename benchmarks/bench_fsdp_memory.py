"""Memory per process of a sharded full fine-tune against the unsharded one, and the plan's
error on both: one SFT step (PaLM.loss, backward, clip, AdamW) of a Cohere-shaped model, on one
process whole and on two CPU processes sharded with FSDP2 (`training.fsdp.shard_models`, as
`--fsdp` does), at a 32,000-token and at Cohere's 256,000-token vocabulary.

Each measurement is a fresh process (two, launched by `accelerate launch`, for FSDP). It reports
its peak resident memory during the second step (the first creates AdamW's state, as in a run)
above what it held after its imports, before the model was built (Linux VmHWM, reset with
clear_refs); glibc is told to return freed blocks above 64 KB (MALLOC_MMAP_THRESHOLD_), so the
whole model each process builds before sharding is given back. `palm-rlhf plan sft --lora-rank 0
[--processes 2 --fsdp]` plans the same step. Medians and ranges over --repeats runs (FSDP: both
processes of each run).

    python benchmarks/bench_fsdp_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory import cpu_name, reset_peak, status_mb  # noqa: E402

SHAPES = {  # vocabulary -> a Cohere-shaped trunk (GQA, no biases, tied embedding)
    32_000: dict(dim=512, depth=8, heads=8, kv_heads=2, dim_head=64, ff_inner=2048),
    256_000: dict(dim=512, depth=8, heads=8, kv_heads=2, dim_head=64, ff_inner=2048),
}
BATCH, SEQ = 2, 512


def palm_config(vocab: int):
    from palm_rlhf import PaLMConfig

    return PaLMConfig(num_tokens=vocab, max_seq_len=SEQ + 1, **SHAPES[vocab])


def worker(vocab: int, fsdp: bool, out: str) -> None:
    import torch
    from accelerate import Accelerator

    from palm_rlhf import PaLM
    from palm_rlhf.training.fsdp import clip_gradients, shard_models

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    start = status_mb("VmRSS")
    torch.manual_seed(0)
    model = PaLM(palm_config(vocab)).train()
    if fsdp:
        shard_models([model], accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1))

    def step() -> None:
        model.loss(tokens).backward()
        clip_gradients(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    gc.collect()
    reset_peak()
    step()
    peak = status_mb("VmHWM") - start
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes, "mb": peak}
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


def two_cpu_processes() -> list[str]:
    """`accelerate launch` of 2 CPU processes (the workers make Accelerator(cpu=True))."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]  # fmt: skip


def run(vocab: int, fsdp: bool) -> list[float]:
    """One measurement: the peak (MB above start) of each process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        args = [__file__, "--worker", str(vocab), str(int(fsdp)), out]
        command = [*two_cpu_processes(), *args] if fsdp else [sys.executable, *args]
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    assert [r["world"] for r in ranks] == [len(ranks)] * len(ranks)
    return [r["mb"] for r in ranks]


def planned_mb(vocab: int, fsdp: bool) -> float:
    from palm_rlhf.plan import PlanSettings, plan_memory

    settings = PlanSettings("sft", batch_size=BATCH, seq_len=SEQ, lora_rank=0,
                            processes=2 if fsdp else 1, fsdp=fsdp)  # fmt: skip
    return plan_memory(palm_config(vocab), settings).peak_bytes / 1e6


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), bool(int(sys.argv[3])), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; full fine-tune SFT step, {BATCH} x {SEQ} tokens, float32")
    print("| vocabulary | processes | measured per process (median, range) | plan | plan error |")
    print("|---|---|---|---|---|")
    for vocab in SHAPES:
        medians = {}
        for fsdp in (False, True):
            values = [mb for _ in range(args.repeats) for mb in run(vocab, fsdp)]
            median = medians[fsdp] = statistics.median(values)
            plan = planned_mb(vocab, fsdp)
            print(f"| {vocab:,} | {'2, FSDP2' if fsdp else '1, whole'} | {median / 1e3:.2f} GB "
                  f"({min(values) / 1e3:.2f}-{max(values) / 1e3:.2f}) | {plan / 1e3:.2f} GB | "
                  f"{(plan - median) / median:+.0%} |", flush=True)  # fmt: skip
        print(f"  {vocab:,}: sharded over 2, each process holds "
              f"{medians[True] / medians[False]:.2f}x the memory of the whole run")  # fmt: skip


if __name__ == "__main__":
    main()
