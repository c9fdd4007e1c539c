"""Benchmark palm_rlhf's PaLM against palm-rlhf-pytorch 0.8.0 and a Hugging Face Llama.

Three decoders of the same size (dim 512, depth 8, 8 query heads of 64, one key/value head,
vocab 256, feed-forward inner 2048, tied embeddings; ~30.0M parameters each) are built from the
same seed and measured in one process, on the CPU, in float32, without torch.compile:

* ours        -- ``palm_rlhf.PaLM`` and ``palm_rlhf.generate`` (KV cache).
* peer        -- ``palm_rlhf_pytorch.PaLM(..., flash_attn=True)`` and its ``generate``; it has no
                 KV cache and runs the model over the whole sequence for every new token.
* hf          -- ``transformers.LlamaForCausalLM`` (SDPA attention, ``generate(use_cache=True)``
                 with its default dynamic cache).

Metrics (medians; threads set with torch.set_num_threads before each phase):

* train tokens/s: batch 4 x 512 tokens of random ids; forward, cross-entropy on the logits
  (computed here, the same way for all three), backward, torch.optim.AdamW step, zero_grad.
  ``--warmup`` untimed steps, then the median of ``--train-steps`` timed steps (default 2 + 5).
  tokens/s = batch * seq / step time.
* gen tokens/s (batch 1 and batch 8): greedy decoding from a 64-token random prompt to 512 total
  tokens (448 new) with no early stop (no EOS id anywhere; each output's length is checked).
  Median of ``--repeats`` (default 3) timed runs after a short warmup run, in inference_mode.
  tokens/s = batch * new tokens / wall time of the whole generate call (prompt prefill included).

Fairness notes:

* Same shapes, parameter counts (printed), dtype, threads, data and greedy decoding for all three.
  All models are built first and measured interleaved (one training step or one generate run of
  each in turn), so slow phases of a shared machine hit every column alike. The min..max of the
  samples and the CPU share other processes took before/during the run are printed (a busy
  machine wrecks 2-thread numbers most); all samples go to ``--json``.
  The architectures differ as the projects do: ours and the peer use PaLM's parallel
  attention + SwiGLU block, Llama a sequential block with two RMSNorms per layer.
* Each model decodes the way its library does by default; the peer has no cache to turn on.
  Its greedy decode still adds (negligible) Gumbel noise, as its generate always does.
* The peer's cost per new token depends only on the current length (it recomputes the full
  sequence), so a full 448-token run at batch 8 would take many minutes. With
  ``--peer-gen-tokens N`` (default 32; 0 = full run) the 64->512 span is cut into 4 equal
  segments; in each, the peer's own generate makes N/4 tokens from a random prompt placed so the
  window sits at the segment's middle, and the time per token there stands for the whole segment
  (midpoint rule). The estimate covers the same 64->512 span as the other two columns; checked
  against full 448-token runs at batch 1 it agrees within run-to-run noise (about 10%).

Usage: python benchmarks/bench_model.py [--only ours,peer,hf] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

FULL = dict(
    num_tokens=256, dim=512, depth=8, heads=8, dim_head=64, batch=4, seq=512, prompt=64, total=512
)
QUICK = dict(
    num_tokens=256, dim=64, depth=2, heads=2, dim_head=32, batch=2, seq=64, prompt=8, total=40
)
NAMES = {"ours": "ours", "peer": "palm-rlhf-pytorch", "hf": "transformers"}
PEER_WINDOWS = 4


def build_ours(c):
    from palm_rlhf import PaLM, PaLMConfig, generate

    model = PaLM(
        PaLMConfig(
            num_tokens=c["num_tokens"],
            dim=c["dim"],
            depth=c["depth"],
            heads=c["heads"],
            dim_head=c["dim_head"],
            max_seq_len=1024,
        )
    )

    def gen(prompts, n_new):
        return generate(
            model,
            list(prompts),
            max_new_tokens=n_new,
            temperature=0.0,
            top_k=None,
            top_p=None,
            eos_id=None,
            pad_id=0,
            seed=0,
        ).tokens

    return model, model, gen


def build_peer(c):
    from palm_rlhf_pytorch import PaLM

    model = PaLM(
        num_tokens=c["num_tokens"],
        dim=c["dim"],
        depth=c["depth"],
        heads=c["heads"],
        dim_head=c["dim_head"],
        flash_attn=True,
    )

    def gen(prompts, n_new):  # generate(seq_len=total length, prompt, ...) -> new tokens only
        return model.generate(
            prompts.shape[1] + n_new, prompts, temperature=0.0, filter_logits_fn=None
        )

    return model, model, gen


def build_hf(c):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = LlamaConfig(
        vocab_size=c["num_tokens"],
        hidden_size=c["dim"],
        intermediate_size=4 * c["dim"],
        num_hidden_layers=c["depth"],
        num_attention_heads=c["heads"],
        num_key_value_heads=1,
        head_dim=c["dim_head"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float()

    def gen(prompts, n_new):
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        return out[:, prompts.shape[1] :]

    return model, lambda tokens: model(input_ids=tokens, use_cache=False).logits, gen


BUILDERS = {"ours": build_ours, "peer": build_peer, "hf": build_hf}


def train_stepper(model, forward, c):
    """Returns step(): one forward + cross-entropy + backward + AdamW step; gives tokens/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, c["num_tokens"], (c["batch"], c["seq"] + 1), generator=g)

    def step():
        model.train()
        t0 = time.perf_counter()
        logits = forward(data[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), data[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        assert torch.isfinite(loss), "non-finite loss"
        return c["batch"] * c["seq"] / dt

    return step


def timed_gen(gen, c, batch, prompt_len, n_new, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, c["num_tokens"], (batch, prompt_len), generator=g)
    t0 = time.perf_counter()
    out = gen(prompts, n_new)
    dt = time.perf_counter() - t0
    assert tuple(out.shape) == (batch, n_new), f"expected {(batch, n_new)}, got {out.shape}"
    return dt


def gen_rate(model, gen, c, batch, seed, windowed_tokens=0):
    """New tokens/s for greedy prompt -> total; windowed: midpoint-rule estimate (see top)."""
    model.eval()
    span = c["total"] - c["prompt"]
    with torch.inference_mode():
        if windowed_tokens <= 0 or windowed_tokens >= span:
            return batch * span / timed_gen(gen, c, batch, c["prompt"], span, seed)
        w, seg, total = max(1, windowed_tokens // PEER_WINDOWS), span / PEER_WINDOWS, 0.0
        for s in range(PEER_WINDOWS):
            start = round(c["prompt"] + (s + 0.5) * seg - w / 2)
            total += seg * timed_gen(gen, c, batch, start, w, seed) / w
    return batch * span / total


def cpu_snapshot():
    """(busy CPU s of the machine, total CPU s, this process's CPU s), or None off Linux."""
    if not os.path.exists("/proc/stat"):
        return None
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz, t = os.sysconf("SC_CLK_TCK"), os.times()
    return (sum(v) - v[3] - v[4]) / hz, sum(v) / hz, t.user + t.system


def others_busy(a, b):
    """Share of all CPU time between snapshots a and b used by other processes (or stolen)."""
    if a is None or b is None:
        return None
    return round(max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / max(1e-9, b[1] - a[1])), 3)


def machine_info(args):
    cpu = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    a = cpu_snapshot()
    time.sleep(1.0)
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "train_threads": args.train_threads,
        "gen_threads": args.gen_threads,
        "others_cpu_before": others_busy(a, cpu_snapshot()),
    }


def fmt(v):
    return "n/a" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def versus(key, ours, peer):
    """How ours compares with a peer on one metric, in words that cannot be misread: "2.10x
    faster" / "1.30x slower" for seconds (s_...) and rates (..._s, ..._per_s), "0.91x the
    memory" for memory (..._mb), "1.00x the parameters"; "" where a ratio means nothing."""
    if not ours or not peer:
        return "n/a"
    if key.startswith("s_") or key.endswith(("_s", "_per_s")):
        speedup = peer / ours if key.startswith("s_") else ours / peer
        return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
    if key.endswith("_mb"):
        return f"{ours / peer:.2f}x the memory"
    if key == "params":
        return f"{ours / peer:.2f}x the parameters"
    return ""


def print_table(results, c):
    span = f"{c['prompt']}->{c['total']}"
    metrics = [
        ("params", "parameters"),
        ("train_tok_s", f"train tokens/s (b{c['batch']} x {c['seq']})"),
        ("gen_b1_tok_s", f"gen new tokens/s, batch 1, {span}"),
        ("gen_b8_tok_s", f"gen new tokens/s, batch 8, {span}"),
    ]
    header = ["metric", *NAMES.values(), f"ours vs {NAMES['peer']}", f"ours vs {NAMES['hf']}"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for key, label in metrics:
        vals = [results.get(k, {}).get(key) for k in NAMES]
        ratios = [versus(key, vals[0], v) for v in vals[1:]]
        print("| " + " | ".join([label] + [fmt(v) for v in vals] + ratios) + " |")


def run(args, c, keys, notes):
    models = {}
    for key in keys:
        torch.manual_seed(0)
        try:
            models[key] = BUILDERS[key](c)
        except ImportError as e:
            notes.append(f"{NAMES[key]}: not importable, skipped ({e})")
            print(f"NOTE: {notes[-1]}", flush=True)
    samples = {
        k: {"params": [sum(p.numel() for p in m.parameters())]} for k, (m, _, _) in models.items()
    }

    # Interleave the models step by step so slow phases of a shared machine hit all of them.
    torch.set_num_threads(args.train_threads)
    steppers = {k: train_stepper(m, fwd, c) for k, (m, fwd, _) in models.items()}
    for i in range(args.warmup + args.train_steps):
        for k, step in steppers.items():
            rate = step()
            if i >= args.warmup:
                samples[k].setdefault("train_tok_s", []).append(rate)
    del steppers  # frees the optimizer states
    print("training done", flush=True)

    torch.set_num_threads(args.gen_threads)
    for b in (1, 8):
        for model, _, gen in models.values():  # warmup: a short run from the real prompt
            with torch.inference_mode():
                model.eval()
                timed_gen(gen, c, b, c["prompt"], min(8, c["total"] - c["prompt"]), seed=1)
        for r in range(args.repeats):
            for k, (model, _, gen) in models.items():
                window = args.peer_gen_tokens if k == "peer" else 0
                rate = gen_rate(model, gen, c, b, seed=2 + r, windowed_tokens=window)
                samples[k].setdefault(f"gen_b{b}_tok_s", []).append(rate)
        print(f"generation at batch {b} done", flush=True)
    return samples


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="ours,peer,hf", help="comma list of ours,peer,hf")
    p.add_argument("--threads", type=int, help="sets both --train-threads and --gen-threads")
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--gen-threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed generation runs")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    p.add_argument(
        "--peer-gen-tokens",
        type=int,
        default=32,
        help="tokens the peer really generates per estimate (0 = full span)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model for a smoke check")
    p.add_argument("--json", help="also write the results to this path")
    args = p.parse_args()
    if args.threads:
        args.train_threads = args.gen_threads = args.threads
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    if set(keys) - set(BUILDERS):
        p.error(f"unknown --only entries: {sorted(set(keys) - set(BUILDERS))}")
    c = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore", category=FutureWarning)  # peer's sdp_kernel deprecation

    info = machine_info(args)
    print("## machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items()))
    print(f"\nconfig: {c}, repeats={args.repeats}, peer_gen_tokens={args.peer_gen_tokens}\n")
    start, notes = cpu_snapshot(), []
    samples = run(args, c, keys, notes)
    info["others_cpu_during"] = others_busy(start, cpu_snapshot())
    for when in ("before", "during"):
        busy = info[f"others_cpu_{when}"]
        if busy is not None and busy > 0.05:
            notes.append(
                f"other processes used {busy:.0%} of the CPUs {when} the run: "
                "numbers are noisy and low (2-thread runs suffer most)"
            )

    results = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in samples.items()}
    for k, d in samples.items():
        spread = ", ".join(f"{m} {fmt(min(v))}..{fmt(max(v))}" for m, v in d.items() if len(v) > 1)
        print(f"{NAMES[k]} min..max: {spread}")
    print()
    print_table(results, c)
    print(
        f"\nother processes' CPU share before / during: {info['others_cpu_before']} / "
        f"{info['others_cpu_during']}"
    )
    for n in notes:
        print(f"NOTE: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "config": c,
                    "args": vars(args),
                    "results": results,
                    "samples": samples,
                    "notes": notes,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
