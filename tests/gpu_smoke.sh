#!/usr/bin/env bash
# The GPU checks, for a session lent a CUDA machine: the `gpu`-marked tests and one throughput
# figure. Under 5 minutes on one GPU. Usage: bash tests/gpu_smoke.sh  (from the repo root, in an
# environment where `pip install -e ".[test,plot]"` has been run with a CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: these checks need a GPU"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
python -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py
# One throughput figure: batched KV-cache generation of the `small` preset (30M parameters),
# bf16, batch 16, 64 prompt + 448 new tokens, median of 3 timed runs after one warm-up.
python - <<'PY'
import statistics
import time

import torch

from palm_rlhf import ByteTokenizer, PaLM, generate
from palm_rlhf.config import preset_config

tok = ByteTokenizer()
model = PaLM(preset_config("small", tok.vocab_size)).cuda().to(dtype=torch.bfloat16).eval()
prompts = [[tok.bos_id, *range(40, 103)] for _ in range(16)]
times = []
for run in range(4):
    torch.cuda.synchronize()
    began = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=448, seed=run)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - began)
new_tokens = out.tokens.numel()
median = statistics.median(times[1:])
print(f"generate, small preset, bf16, batch 16: {new_tokens / median:,.0f} new tokens/s "
      f"(median of 3: {median:.2f} s per call)")
PY
