"""The worker harness `bench_ppo.py` and `bench_grpo.py` share: each framework runs in its own
process (peak memories do not mix), the parent asks every worker for one iteration in turn over
a pipe (the others wait idle, so slow phases of a shared machine hit every column alike), and
each reply carries the iteration's seconds, the worker's peak RSS, CPU time and thread count.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_model import cpu_snapshot, others_busy


def keep_eos_out(policy, eos_id):
    """Hook our policy so that eos never wins while it decodes: every response has all its
    tokens, like the peers'. Decoding's forwards return logits; the log-prob passes return
    per-token statistics computed in chunks, which are left as they are."""
    import torch

    eos = torch.tensor([eos_id])

    def hook(module, inputs, out):
        return out.index_fill(-1, eos, -1e4) if isinstance(out, torch.Tensor) else out

    policy.register_forward_hook(hook)


def timed(fn, acc):
    """fn, appending each call's seconds to acc."""

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        acc.append(time.perf_counter() - t0)
        return out

    return wrapper


class Link:
    """Worker side of the pipe protocol: 'step' lines in, one JSON line out per iteration."""

    def __init__(self, fd):
        self.out, self.t0 = os.fdopen(fd, "w"), 0.0

    def send(self, **msg):
        import torch

        t, rss = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        msg.update(rss_mb=rss, cpu_s=t.user + t.system, threads=torch.get_num_threads())
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def begin(self):
        ok = sys.stdin.readline().strip() == "step"
        self.t0 = time.perf_counter()
        return ok

    def end(self, **info):
        self.send(dt=time.perf_counter() - self.t0, **info)


def serve(link, build, c, args):
    """A worker built by build(c, args, learn_times) -> (params, step): answer each 'step'."""
    learn_times = []
    params, step = build(c, args, learn_times)
    link.send(params=params)
    while link.begin():
        info = step()
        link.end(learn_s=sum(learn_times) if learn_times else None, **info)
        learn_times.clear()


def spawn(script, key, flags, log_dir):
    """Start `script --worker key --fd W *flags`, its output in log_dir/key.log."""
    r, w = os.pipe()
    cmd = [sys.executable, os.path.abspath(script), "--worker", key, "--fd", str(w), *flags]
    with open(Path(log_dir) / f"{key}.log", "w") as log:
        pipes = dict(stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,))
        proc = subprocess.Popen(cmd, text=True, **pipes)
    os.close(w)
    return proc, os.fdopen(r), log.name


def request(worker_state, command):
    proc, reader, log_name = worker_state
    if command:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
    line = reader.readline()
    if not line:
        tail = Path(log_name).read_text()[-2000:]
        raise RuntimeError(f"worker exited (code {proc.wait()}); end of {log_name}:\n{tail}")
    return json.loads(line)


def run_interleaved(script, keys, names, flags, args, log_dir, info):
    """Build the workers one at a time (imports and model builds do not overlap), then run
    --warmup + --repeats iterations in turn. Returns (samples per key, notes); records the
    other processes' CPU share during the run in info["others_cpu_during"]."""
    workers, samples, notes, cpu = {}, {}, [], {}

    def call(k, command, what):
        try:
            res = request(workers[k], command)
        except RuntimeError as e:
            notes.append(f"{names[k]}: {what}: {e}")
            print(f"NOTE: {notes[-1]}", flush=True)
            del workers[k]
            return None
        cpu[k] = res["cpu_s"]  # the workers' CPU time is this benchmark's, not "others"
        if res["threads"] != args.threads:
            notes.append(f"{names[k]} ran with {res['threads']} threads, not {args.threads}")
        return res

    for k in keys:
        workers[k] = spawn(script, k, flags, log_dir)
        if ready := call(k, None, "skipped"):
            samples[k] = {"params": ready["params"], "setup_rss_mb": ready["rss_mb"], "runs": []}
    start = cpu_snapshot()
    start = start and (*start[:2], start[2] + sum(cpu.values()))
    for i in range(args.warmup + args.repeats):
        for k in list(workers):
            if res := call(k, "step", f"failed in iteration {i}"):
                samples[k]["peak_rss_mb"] = res["rss_mb"]
                samples[k]["runs"] += [res] if i >= args.warmup else []
        print(f"iteration {i + 1}/{args.warmup + args.repeats} done", flush=True)
    end = cpu_snapshot()
    info["others_cpu_during"] = others_busy(start, end and (*end[:2], end[2] + sum(cpu.values())))
    for proc, reader, _ in workers.values():
        proc.stdin.close()
        proc.wait(timeout=120)
        reader.close()
    return samples, notes
