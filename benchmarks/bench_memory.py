"""Peak memory of training at a real vocabulary: one SFT step and one GRPO iteration of a tiny
trunk with Cohere's 256,000-token vocabulary, ours (log-probs, entropy and the loss from hidden
states in chunks), the full-logits path the stages used before (the same code with the chunked
function swapped for one that builds the (batch x length x vocab) logits and their float32
log-softmax), ours with activation checkpointing, and TRL's GRPO iteration at the same shape.

The model is Cohere-shaped (what `import-hf` gives for a Cohere config with these sizes): width
64, 2 layers, 2 query heads of 32, one key/value head, feed-forward 256, a 256,000-row tied
embedding (16.4M of its 16.5M parameters: 66 MB in float32). Everything runs on the CPU in
float32 with torch.set_num_threads(--threads).

* SFT step: one AdamW step of `PaLM.loss` (next-token cross-entropy with z-loss, what
  `palm-rlhf sft` computes per micro-batch) on random ids, B x 512 tokens, B = 2 and 8.
* GRPO iteration: `GRPOTrainer.step()` at GRPOConfig's defaults (G = 8 responses of 64 new tokens
  per prompt, minibatches of 32, kl_coef 0.04, LoRA rank 8 on a frozen base) for 4 and 16 prompts
  of 32 tokens; a hook keeps eos out so every response is 64 tokens long. TRL 1.12's
  `GRPOTrainer` runs the same iteration: CohereForCausalLM of the same shape, PEFT LoRA rank 8
  (alpha 16, every linear layer of the blocks; its reference is the base with adapters off, as
  ours), per_device_train_batch_size 32, steps_per_generation = responses / 32 (one generation
  feeding the same minibatch updates), num_generations 8, max_completion_length 64 with
  min_new_tokens 64, beta 0.04, no vLLM, float32, on the CPU; a WordLevel tokenizer of 256,000
  words so any sampled id decodes.

Each measurement runs in a fresh process and reports its peak resident memory (VmHWM), in total
and above what the process held after its imports and its tokenizer, before the model was built
(Linux only); an SFT step is the second of two (the optimizer state exists, as in a run). Medians
and ranges over --repeats processes.

    python benchmarks/bench_memory.py [--repeats 3] [--grpo-repeats 1] [--only sft,grpo,trl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB, DIM, DEPTH, HEADS, DIM_HEAD, FF = 256_000, 64, 2, 2, 32, 256
SEQ = 512
PROMPT, NEW, GROUP, MINIBATCH = 32, 64, 8, 32


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """Reset VmHWM to the current resident size (Linux: clear_refs 5); return that size."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_mb("VmRSS")


def palm_config():
    from palm_rlhf import PaLMConfig

    return PaLMConfig(
        num_tokens=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS, kv_heads=1, dim_head=DIM_HEAD,
        ff_inner=FF, max_seq_len=SEQ + 16, logit_scale=0.0625,
    )  # fmt: skip


def use_full_logits() -> None:
    """Swap the chunked log-prob function for the full-logits one every stage used before:
    logits (b, n, v), their float32 log-softmax, the target's entry, log Z and entropy."""
    import torch.nn.functional as F

    import palm_rlhf.model.palm as palm_module
    from palm_rlhf.losses.logprobs import TokenStats, entropy_from_logits

    def full(hidden, weight, targets, scale=1.0, temperature=1.0, entropy=False, chunk_size=None):
        # As the stages computed it: the tied output layer's logits (b, n, v), the float32
        # log-softmax (a second (b, n, v) tensor), the target's entry, log Z for the z-loss.
        logits = F.linear(hidden, weight) * scale
        if temperature != 1.0:
            logits = logits / temperature
        logp = logits.float().log_softmax(dim=-1)
        logprobs = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        log_z = logits.float().logsumexp(dim=-1)
        ent = entropy_from_logits(logits) if entropy else None
        return TokenStats(logprobs, log_z, ent)

    palm_module.token_stats_from_hidden = full


def sft_step(batch: int, checkpointing: bool, start) -> dict:
    """The second of two steps: a run's steady state, its optimizer state already there."""
    import torch

    from palm_rlhf import PaLM

    torch.manual_seed(0)
    start()
    model = PaLM(palm_config()).train().set_activation_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1))
    for step in range(2):
        if step == 1:
            reset_peak()  # the peak of step 2 alone, still counted from the same start
            began = time.perf_counter()
        loss = model.loss(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - began, "loss": loss.item()}


def word_tokenizer():
    """A WordLevel tokenizer over the whole vocabulary ("<id>" words; pad, bos and eos the last
    three ids), so any id a random policy samples decodes; ours and TRL's read the same one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"<{i}>": i for i in range(VOCAB - 3)}
    vocab |= {"<pad>": VOCAB - 3, "<bos>": VOCAB - 2, "<eos>": VOCAB - 1}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return words


def prompt_texts(prompts: int) -> list[str]:
    import torch

    g = torch.Generator().manual_seed(1)
    rows = torch.randint(33, 127, (prompts, PROMPT - 1), generator=g).tolist()
    return [" ".join(f"<{i}>" for i in row) for row in rows]


def grpo_iteration(prompts: int, checkpointing: bool, start) -> dict:
    import torch

    from palm_rlhf import GRPOConfig, GRPOTrainer, PaLM
    from palm_rlhf.tokenizers.hf import HFTokenizer

    torch.manual_seed(0)
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    tok = HFTokenizer({"tokenizer.json": word_tokenizer().to_str(),
                       "tokenizer_config.json": json.dumps(specials)})  # fmt: skip
    start()  # the tokenizer (0.15 GB for 256,000 words) is not the iteration's
    policy = PaLM(palm_config())
    eos = torch.tensor([tok.eos_id])
    policy.register_forward_hook(
        lambda m, i, out: out.index_fill(-1, eos, -1e4) if torch.is_tensor(out) else out
    )
    config = GRPOConfig(
        prompts_per_iteration=prompts, minibatch_size=MINIBATCH, max_new_tokens=NEW,
        max_prompt_tokens=PROMPT, no_eos_penalty=float("nan"),
        activation_checkpointing=checkpointing,
    )  # fmt: skip
    trainer = GRPOTrainer(policy, tok, prompt_texts(prompts), reward_fns=[count_a],
                          config=config, show_progress=False)  # fmt: skip
    began = time.perf_counter()
    metrics = trainer.step()
    return {"seconds": time.perf_counter() - began, "response_len": metrics["response_len"]}


def count_a(prompts, responses, **fields):
    return [float(r.split().count("<97>")) for r in responses]


def trl_grpo_iteration(prompts: int, start) -> dict:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[key] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers as tf
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.utils import logging
    from trl import GRPOConfig, GRPOTrainer

    logging.set_verbosity_error()
    torch.manual_seed(0)
    specials = dict(pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(), padding_side="left", **specials
    )
    start()
    config = tf.CohereConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FF, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=SEQ + 16,
        logit_scale=0.0625, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 3,
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench_memory_trl_"))
    tf.CohereForCausalLM(config).save_pretrained(work / "policy")
    policy = tf.CohereForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    texts = prompt_texts(prompts)
    responses = prompts * GROUP
    steps = responses // MINIBATCH
    args = GRPOConfig(
        per_device_train_batch_size=MINIBATCH, steps_per_generation=steps,
        gradient_accumulation_steps=1, num_generations=GROUP, num_iterations=1,
        max_completion_length=NEW, generation_kwargs={"min_new_tokens": NEW}, temperature=1.0,
        top_k=0, top_p=1.0, beta=0.04, bf16=False, gradient_checkpointing=False, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        output_dir=str(work / "out"), seed=0, max_steps=steps,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")

    def trl_count_a(prompts, completions, **kw):
        return [float(text.split().count("<97>")) for text in completions]

    trainer = GRPOTrainer(model=policy, reward_funcs=[trl_count_a], args=args,
                          train_dataset=Dataset.from_dict({"prompt": texts}),
                          processing_class=tok, peft_config=lora)  # fmt: skip
    began = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - began}


def worker(kind: str, size: int, path: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if kind == "trl":
        import transformers  # noqa: F401  (imports before the baseline, as for ours)
        import trl  # noqa: F401
    import palm_rlhf  # noqa: F401

    if path == "full":
        use_full_logits()
    base = {}

    def start() -> None:  # after imports and tokenizer, before the model is built
        base["rss"] = reset_peak()

    if kind == "sft":
        result = sft_step(size, path == "checkpointing", start)
    elif kind == "grpo":
        result = grpo_iteration(size, path == "checkpointing", start)
    else:
        result = trl_grpo_iteration(size, start)
    peak = status_mb("VmHWM")
    print(json.dumps({**result, "peak_mb": peak, "above_start_mb": peak - base["rss"]}))


CASES = [
    ("sft", 2, "ours"), ("sft", 2, "full"), ("sft", 8, "ours"), ("sft", 8, "full"),
    ("sft", 8, "checkpointing"),
    ("grpo", 4, "ours"), ("grpo", 4, "mmap"), ("grpo", 4, "full"), ("trl", 4, "trl"),
    ("grpo", 16, "ours"), ("grpo", 16, "mmap"), ("grpo", 16, "full"),
    ("grpo", 16, "checkpointing"), ("trl", 16, "trl"),
]  # fmt: skip
# glibc's malloc raises its mmap threshold as large buffers are freed, then serves buffers up to
# 32 MB from its heaps and keeps what they free: an RSS a tensor count never sees. "mmap" runs
# ours with the threshold fixed at 4 MB (MALLOC_MMAP_THRESHOLD_), which returns them.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
LABELS = {
    "ours": "ours (chunked)",
    "full": "full logits (before)",
    "checkpointing": "ours + activation checkpointing",
    "trl": "TRL 1.12 (PEFT LoRA)",
    "mmap": "ours, malloc mmap threshold 4 MB",
}


def measure(kind, size, path, threads, repeats):
    runs = []
    for _ in range(repeats):
        command = [sys.executable, __file__, "--worker", kind, str(size), path, str(threads)]
        env = {**os.environ, **(FIXED_MMAP if path == "mmap" else {})}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {}
    for key in ("peak_mb", "above_start_mb", "seconds"):
        values = [r[key] for r in runs]
        out[key] = (statistics.median(values), min(values), max(values))
    return out


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per SFT case")
    parser.add_argument("--grpo-repeats", type=int, default=1, help="processes per GRPO case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="sft,grpo,trl", help="comma list of sft, grpo, trl")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plan-only", type=Path, default=None,
                        help="print the plan's errors against a saved --json and stop")  # fmt: skip
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, size, path, threads = args.worker
        worker(kind, int(size), path, int(threads))
        return
    import torch

    if args.plan_only:
        plan_errors(json.loads(args.plan_only.read_text()))
        return
    wanted = set(args.only.split(","))
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; vocab {VOCAB:,}, width {DIM}, {DEPTH} layers")  # fmt: skip
    results = {}
    for kind, size, path in CASES:
        if kind not in wanted:
            continue
        repeats = args.repeats if kind == "sft" else args.grpo_repeats
        result = measure(kind, size, path, args.threads, repeats)
        results[f"{kind}/{size}/{path}"] = result
        what = f"SFT step {size} x {SEQ}" if kind == "sft" else f"GRPO iteration {size} x {GROUP}"
        if "error" in result:
            print(f"{what:28s} {LABELS[path]:34s} failed: {result['error']}", flush=True)
            continue
        peak, above, secs = result["peak_mb"], result["above_start_mb"], result["seconds"]
        print(
            f"{what:28s} {LABELS[path]:34s} peak {peak[0] / 1024:6.2f} GB "
            f"[{peak[1] / 1024:.2f}-{peak[2] / 1024:.2f}], above start {above[0] / 1024:6.2f} GB, "
            f"{secs[0]:7.1f} s [{secs[1]:.1f}-{secs[2]:.1f}]",
            flush=True,
        )
    print()
    for kind, size in [("sft", 2), ("sft", 8), ("grpo", 4), ("grpo", 16)]:
        ours = results.get(f"{kind}/{size}/ours")
        if not ours or "error" in ours:
            continue
        for other in ("full", "checkpointing", "mmap", "trl"):
            them = results.get(f"{'trl' if other == 'trl' else kind}/{size}/{other}")
            if them and "error" not in them:
                ratio = ours["peak_mb"][0] / them["peak_mb"][0]
                print(f"{kind} {size}: ours uses {ratio:.2f}x the peak memory of "
                      f"{LABELS[other]}")  # fmt: skip
    print()
    plan_errors(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def planned_bytes(kind: str, size: int, path: str) -> int:
    """What `palm-rlhf plan` says the same step needs."""
    from palm_rlhf.plan import PlanSettings, plan_memory

    checkpointing = path == "checkpointing"  # ("mmap" is ours under another malloc setting)
    if kind == "sft":
        settings = PlanSettings("sft", batch_size=size, seq_len=SEQ,
                                activation_checkpointing=checkpointing)  # fmt: skip
    else:
        settings = PlanSettings("grpo", rollout_rows=size * GROUP, max_prompt_tokens=PROMPT,
                                max_new_tokens=NEW, minibatch_size=MINIBATCH,
                                activation_checkpointing=checkpointing)  # fmt: skip
    return plan_memory(palm_config(), settings).peak_bytes


def plan_errors(results: dict) -> None:
    """The plan against the measured peak above the process's start (the plan counts the
    step's tensors, not the Python and torch runtime)."""
    for key, result in results.items():
        kind, size, path = key.split("/")
        if kind == "trl" or path == "full" or "error" in result:
            continue
        planned = planned_bytes(kind, int(size), path) / 2**20
        measured = result["above_start_mb"][0]
        print(f"plan {key:22s} {planned / 1024:6.2f} GB, measured {measured / 1024:6.2f} GB: "
              f"{100 * (planned - measured) / measured:+.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
