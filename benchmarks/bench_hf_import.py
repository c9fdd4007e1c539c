"""Peak memory of bringing a Hugging Face Cohere model into palm_rlhf, against transformers.

A random CohereForCausalLM of about 200M parameters (dim 1024, 12 layers, GQA 16/4 heads,
feed-forward 2816, a 64k vocabulary; bfloat16, as hub checkpoints are stored) is saved with
save_pretrained in 200MB shards plus a tiny BPE. Each measurement then runs in a fresh process,
which reports its peak resident memory (VmHWM, reset after its imports, so the Python, torch
and transformers runtime are not counted) above its resident size at that point, in units of
the model's size in the file (Linux only):

- ours, import-hf:      import_hf(dir, out): stream every tensor into our checkpoint
- ours, from_pretrained: PaLM.from_pretrained(out): meta device + assign, in the file's dtype,
                         then every weight read once (the file is mapped, pages load on touch)
- ours, import-hf f32:  import_hf(dir, out, dtype=float32): upcast tensor by tensor (2x bytes)
- transformers:          CohereForCausalLM.from_pretrained(dir, dtype=bfloat16), the peer,
                         every weight read once too

One copy of the model is 1.0; "well under two copies" is the import's target.

    python benchmarks/bench_hf_import.py [--repeats 3] [--small]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(
    vocab_size=65536, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
    logit_scale=0.0625, rope_theta=10000.0, use_qk_norm=True, bos_token_id=2, eos_token_id=5,
    pad_token_id=0,
)  # fmt: skip
SMALL = dict(CONFIG, hidden_size=256, intermediate_size=704, num_hidden_layers=2, vocab_size=8192)


WORKER = r"""
import json, sys, torch, transformers, tokenizers
from palm_rlhf import PaLM
from palm_rlhf.hf import import_hf
def status(field):  # kB from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
# Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current resident size, so the
# peak below is the work's alone, not the imports' (which can exceed a small model's).
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
kind, source, out = sys.argv[1:4]
if kind == "import":
    import_hf(source, out, show_progress=False)
elif kind == "import_f32":
    import_hf(source, out, dtype=torch.float32, show_progress=False)
elif kind == "load":
    model = PaLM.from_pretrained(out)
elif kind == "transformers":
    model = transformers.CohereForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
if kind in ("load", "transformers"):
    # Both loaders map the file copy-on-write and read pages on first touch: read every
    # weight once, as a first forward would, so that what is counted is the loaded model.
    with torch.no_grad():
        for param in model.parameters():
            param.sum()
print(json.dumps({"base_mb": base, "peak_mb": status("VmHWM")}))
"""


def measure(kind: str, source: Path, out: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, kind, str(source), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["peak_mb"] - result["base_mb"]


def build(directory: Path, config: dict) -> tuple[int, float]:
    """Save the random model and a tokenizer; return (parameters, MB of weights on disk)."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from bpe import write_tokenizer

    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(transformers.CohereConfig(**config))
    model = model.to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="200MB")
    write_tokenizer(directory)
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 2**20
    return sum(p.numel() for p in model.parameters()), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a 10M model, for a quick check")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        params, size_mb = build(work / "hf", SMALL if args.small else CONFIG)
        print(f"model: {params / 1e6:.0f}M parameters, {size_mb:.0f} MB of bf16 weights")
        print(f"machine: {platform.machine()}, python {platform.python_version()}")
        rows = {}
        for kind in ("import", "load", "import_f32", "transformers"):
            runs = []
            for _ in range(args.repeats):
                out = work / ("ours_f32" if kind == "import_f32" else "ours")
                if kind != "load":
                    for path in sorted(out.glob("*")) if out.exists() else []:
                        path.unlink()
                runs.append(measure(kind, work / "hf", out))
            rows[kind] = statistics.median(runs)
        labels = {
            "import": "ours, import-hf (bf16 kept)",
            "load": "ours, PaLM.from_pretrained",
            "import_f32": "ours, import-hf --dtype float32",
            "transformers": "transformers from_pretrained",
        }
        print(f"\npeak memory above the process's baseline, median of {args.repeats}:")
        for kind, label in labels.items():
            copies = rows[kind] / size_mb
            print(f"  {label:34s} {rows[kind]:8.0f} MB  = {copies:4.2f} x the model's size")
        print(
            f"\nratio, ours (from_pretrained) / transformers: "
            f"{rows['load'] / rows['transformers']:.2f}"
        )


if __name__ == "__main__":
    main()
