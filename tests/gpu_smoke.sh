#!/usr/bin/env bash
# The GPU checks, for a session lent a CUDA machine: the `gpu`-marked tests (issue 19's paths
# among them: chunked log-probs, activation checkpointing, a bf16 base through one-base LoRA
# PPO; issue 20's FSDP2 on one GPU), a sharded pretraining run through the README's launch
# config, and two throughput figures. Under 5 minutes on one GPU. Usage: bash tests/gpu_smoke.sh  (from the repo root, in an
# environment where `pip install -e ".[test,plot]"` has been run with a CUDA build of torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: these checks need a GPU"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
python -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py
# Issue 20: a 1-GPU FSDP2 step (world size 1) through the README's launch config, as a user
# runs it (examples/accelerate/gpus.yaml, --num_processes 1; the test above covers GRPO).
fsdp_out=$(mktemp -d)
accelerate launch --config_file examples/accelerate/gpus.yaml --num_processes 1 \
    -m palm_rlhf.cli pretrain --fsdp --mixed-precision bf16 --preset tiny --steps 2 \
    --batch-size 4 --seq-len 128 \
    --warmup-steps 1 --eval-batches 1 --sample-every 2 --out "$fsdp_out/run" | tail -1
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
# Issue 19's figure: tokens/s of one LoRA GRPO iteration at the largest Cohere shape that
# `palm-rlhf plan` says fits this GPU (Command R7B's layers, cut to what fits, bf16 base,
# 256,000-token vocabulary; 16 prompts x 8 responses of 64 new tokens).
python - <<'PY'
import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from bench_memory import prompt_texts, word_tokenizer  # a tokenizer for all 256,000 ids

from palm_rlhf import GRPOConfig, GRPOTrainer, PaLM, PaLMConfig
from palm_rlhf.plan import PlanSettings, plan_memory
from palm_rlhf.tokenizers.hf import HFTokenizer

free = torch.cuda.mem_get_info()[0] * 0.85
shape = dict(num_tokens=256_000, dim=4096, heads=32, kv_heads=8, dim_head=128, ff_inner=14336,
             max_seq_len=8192, logit_scale=0.25)
settings = PlanSettings("grpo", stored_dtype="bfloat16", max_prompt_tokens=32, mixed_precision="bf16")
depth = 32
while depth > 1 and plan_memory(PaLMConfig(depth=depth, **shape), settings).peak_bytes > free:
    depth //= 2
config = PaLMConfig(depth=depth, **shape)
torch.manual_seed(0)
policy = PaLM(config).to(torch.bfloat16)
specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
tok = HFTokenizer({"tokenizer.json": word_tokenizer().to_str(),
                   "tokenizer_config.json": json.dumps(specials)})
grpo = GRPOConfig(max_prompt_tokens=32, mixed_precision="bf16", no_eos_penalty=float("nan"))
trainer = GRPOTrainer(policy, tok, prompt_texts(64), reward_fns=[lambda p, r, **k: [len(x) for x in r]],
                      config=grpo, show_progress=False)
trainer.step()  # warm-up
torch.cuda.synchronize()
began = time.perf_counter()
metrics = trainer.step()
torch.cuda.synchronize()
seconds = time.perf_counter() - began
tokens = 16 * 8 * (32 + metrics["response_len"])
print(f"LoRA GRPO iteration, Cohere R7B width, {depth} layers, bf16 base, vocab 256,000: "
      f"{tokens / seconds:,.0f} tokens/s ({seconds:.1f} s), peak "
      f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
PY
