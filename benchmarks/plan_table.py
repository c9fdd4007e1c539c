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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from palm_rlhf.hf.config import palm_config_from_hf
from palm_rlhf.plan import PlanSettings, plan_memory

CONFIGS = Path(__file__).parents[1] / "tests" / "hf" / "hub_configs"
MODELS = {"Command R7B": "c4ai-command-r7b-12-2024", "Aya Expanse 32B": "aya-expanse-32b"}
STAGES = ("sft", "reward", "dpo", "grpo", "ppo")
DEVICES = {"80 GB": 80e9, "24 GB": 24e9}


def settings(stage: str, batch: int, checkpointing: bool, dtype: str) -> PlanSettings:
    common = dict(stored_dtype=dtype, mixed_precision="bf16", lora_rank=8,
                  activation_checkpointing=checkpointing)  # fmt: skip
    if stage in ("grpo", "ppo"):
        return PlanSettings(stage, rollout_rows=batch, minibatch_size=batch,
                            max_prompt_tokens=512, max_new_tokens=512, **common)  # fmt: skip
    return PlanSettings(stage, batch_size=batch, seq_len=2048, **common)


def largest_batch(config, stage, checkpointing, dtype, memory) -> tuple[int, float]:
    """(largest batch that fits, its planned peak); 0 when not even batch 1 fits."""
    one = plan_memory(config, settings(stage, 1, checkpointing, dtype)).peak_bytes
    if one > memory:
        return 0, one
    two = plan_memory(config, settings(stage, 2, checkpointing, dtype)).peak_bytes
    slope = max(1, two - one)
    batch = 1 + int((memory - one) // slope)
    peak = plan_memory(config, settings(stage, batch, checkpointing, dtype)).peak_bytes
    while batch > 1 and peak > memory:  # the line is a prediction: the plan decides
        batch = max(1, int(batch * memory / peak))
        peak = plan_memory(config, settings(stage, batch, checkpointing, dtype)).peak_bytes
    return batch, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list of stages")
    args = parser.parse_args()
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
