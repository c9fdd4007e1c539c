"""The README's memory table: for Command R7B's and Aya Expanse 32B's shapes (their published
config.json, bf16 weights, 256,000-token vocabulary), the largest batch of each stage that
`palm-rlhf plan` says fits on an 80 GB and a 24 GB device, with and without activation
checkpointing.

Batch means: sft, reward and dpo: sequences (dpo and reward: preference pairs, two rows each)
of 2,048 tokens per micro-batch; grpo and ppo: responses per iteration, all in one minibatch,
each a 512-token prompt and 512 new tokens. LoRA rank 8 on every stage (sft: `--lora-rank 8`),
mixed precision bf16. A step's peak is linear in the batch at fixed
shapes (every activation is per row), so two plans (batch 1 and 2) give the line, and a third
at the predicted largest batch checks it.

    python benchmarks/plan_table.py [--json out.json]
    python benchmarks/plan_table.py --fsdp   # Aya Expanse 32B LoRA GRPO and 8B full SFT
                                             # on 8 x 80 GB, sharded with FSDP2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from palm_rlhf.hf.config import palm_config_from_hf
from palm_rlhf.plan import PlanSettings, plan_memory

CONFIGS = Path(__file__).parents[1] / "tests" / "hf" / "hub_configs"
MODELS = {"Command R7B": "c4ai-command-r7b-12-2024", "Aya Expanse 32B": "aya-expanse-32b"}
STAGES = ("sft", "reward", "dpo", "grpo", "ppo")
DEVICES = {"80 GB": 80e9, "24 GB": 24e9}


def settings(
    stage: str, batch: int, checkpointing: bool, dtype: str, **sharding: Any
) -> PlanSettings:
    """sharding: processes, fsdp and lora_rank (0: a full fine-tune) for the FSDP table."""
    common = dict(stored_dtype=dtype, mixed_precision="bf16", lora_rank=8,
                  activation_checkpointing=checkpointing)  # fmt: skip
    common.update(sharding)
    if stage in ("grpo", "ppo"):
        return PlanSettings(stage, rollout_rows=batch, minibatch_size=batch,
                            max_prompt_tokens=512, max_new_tokens=512, **common)  # fmt: skip
    return PlanSettings(stage, batch_size=batch, seq_len=2048, **common)


def largest_batch(
    config, stage, checkpointing, dtype, memory, cap: int = 0, **sharding
) -> tuple[int, float]:
    """(largest batch that fits, its planned peak); 0 when not even batch 1 fits. cap > 0:
    stop at that batch (planning a step of hundreds of 2,048-token rows goes through thousands
    of logits chunks, minutes on this CPU)."""

    def peak_at(batch: int) -> float:
        return plan_memory(
            config, settings(stage, batch, checkpointing, dtype, **sharding)
        ).peak_bytes

    one = peak_at(1)
    if one > memory:
        return 0, one
    slope = max(1, peak_at(2) - one)
    batch = 1 + int((memory - one) // slope)
    if cap:
        batch = min(batch, cap)
    peak = peak_at(batch)
    while batch > 1 and peak > memory:  # the line is a prediction: the plan decides
        batch = max(1, int(batch * memory / peak))
        peak = peak_at(batch)
    return batch, peak


FSDP_CAP = 32  # the FSDP table's largest batch reads "32" for "at least 32"
# The FSDP table: (model, stage, LoRA rank or 0 for a full fine-tune) on 8 devices of 80 GB.
SHARDED = (("Aya Expanse 32B", "grpo", 8), ("Aya Expanse 8B", "sft", 0))
SHARDED_NAMES = {"Aya Expanse 8B": "aya-expanse-8b", **MODELS}


def fsdp_table(
    processes: int = 8, memory: float = 80e9, models: tuple = SHARDED
) -> list[dict[str, Any]]:
    """Per process: the peak at batch 1 and the largest batch, on one device (no sharding)
    and on `processes` devices with FSDP2, with and without activation checkpointing. A LoRA
    stage over an fp16 file runs with --base-dtype bfloat16 (AUTOCAST_COPIES)."""
    rows = []
    for model, stage, rank in models:
        raw = json.loads((CONFIGS / f"{SHARDED_NAMES[model]}.json").read_text())
        config = palm_config_from_hf(raw)
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        for checkpointing in (False, True):
            layouts = [(1, False, True), (processes, True, True)]
            if stage in ("grpo", "ppo"):  # and decoding sharded instead of gathered
                layouts.append((processes, True, False))
            for world, fsdp, gathered in layouts:
                sharding = dict(processes=world, fsdp=fsdp, lora_rank=rank)
                if not gathered:
                    sharding["sample_gathered"] = False
                if rank and dtype == "float16":  # convert once, not per pass under autocast
                    sharding["base_dtype"] = "bfloat16"
                one = plan_memory(config, settings(stage, 1, checkpointing, dtype, **sharding))
                batch, _ = largest_batch(
                    config, stage, checkpointing, dtype, memory, cap=FSDP_CAP, **sharding
                )
                rows.append(dict(model=model, stage=stage, lora_rank=rank, processes=world,
                                 fsdp=fsdp, sample_gathered=gathered,
                                 checkpointing=checkpointing,
                                 peak_at_1=one.peak_bytes, phase=one.phase,
                                 largest_batch=batch))  # fmt: skip
                print(f"| {model} | {'LoRA ' if rank else 'full '}{stage} | "
                      f"{'yes' if checkpointing else 'no'} | {world} x 80 GB"
                      f"{' FSDP' if fsdp else ''}{'' if gathered else ', sharded decoding'}"
                      f" | {one.peak_bytes / 1e9:.1f} GB "
                      f"({one.phase}) | {'>= ' if batch == FSDP_CAP else ''}{batch} |",
                      flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list of stages")
    parser.add_argument("--fsdp", action="store_true", help="the 8 x 80 GB FSDP table instead")
    args = parser.parse_args()
    if args.fsdp:
        chosen = tuple(row for row in SHARDED if row[1] in args.stages.split(","))
        rows = fsdp_table(models=chosen)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    rows = []
    for model, name in MODELS.items():
        raw = json.loads((CONFIGS / f"{name}.json").read_text())
        config = palm_config_from_hf(raw)
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        for stage in args.stages.split(","):
            for checkpointing in (False, True):
                began = time.perf_counter()
                cells = {}
                for device, memory in DEVICES.items():
                    cells[device] = largest_batch(config, stage, checkpointing, dtype, memory)
                rows.append(dict(model=model, stage=stage, checkpointing=checkpointing,
                                 **{d: c[0] for d, c in cells.items()}))  # fmt: skip
                seconds = time.perf_counter() - began
                print(f"| {model} | {stage} | {'yes' if checkpointing else 'no'} | "
                      f"{cells['80 GB'][0]} | {cells['24 GB'][0]} |  ({seconds:.0f} s)",
                      flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
