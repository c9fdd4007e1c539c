"""`palm-rlhf plan STAGE MODEL [that stage's flags] --device-memory 80GB [--json]`: the memory
one step of a stage needs, from the model's config.json alone (`palm_rlhf.plan`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import PaLMConfig
from ..hf.config import palm_config_from_hf
from ..model.reward import RewardConfig
from ..plan import STAGES, PlanSettings, parse_size, plan_memory
from ..rl.config import GRPOConfig, PPOConfig
from ..storage.atomic import read_json
from ..storage.checkpoint import WEIGHTS_NAME, resolve_run_dir
from ..storage.safetensors import stored_dtype
from ..training.config import DPOConfig, TrainConfig
from ..training.reward import NOT_FOR_REWARD
from ..training.step import AUTOCAST_COPIES
from .options import add_dataclass_options, dataclass_from_args

STAGE_CONFIGS = {
    "pretrain": [TrainConfig],
    "sft": [TrainConfig],
    "reward": [TrainConfig, RewardConfig],
    "dpo": [TrainConfig, DPOConfig],
    "grpo": [GRPOConfig],
    "ppo": [PPOConfig],
}
PLANNED_DTYPES = ("float32", "bfloat16", "float16")  # what a base can be planned in


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="the memory one step of a stage needs, before a run (no weights read)",
        description="Build the stage's models on fake tensors from MODEL's config.json (a "
        "palm_rlhf checkpoint, a Hugging Face Cohere directory, or the config.json itself) and "
        "run one step of the stage on them, counting every tensor: the peak and what it holds, "
        "and whether it fits in --device-memory. Takes the stage's own flags.",
    )
    stages = parser.add_subparsers(dest="stage", required=True)
    for stage in STAGES:
        sub = stages.add_parser(stage, help=f"plan one step of `palm-rlhf {stage}`")
        sub.add_argument("model", type=Path, help="checkpoint or HF directory, or a config.json")
        sub.add_argument(
            "--device-memory", default="80GB", help="memory of one device: 80GB, 24GiB [80GB]"
        )
        sub.add_argument("--json", action="store_true", help="print the plan as JSON")
        sub.add_argument(
            "--processes",
            type=int,
            default=1,
            help="processes the run is launched on; with --fsdp the plan is one process's "
            "share of the sharded models (without it each process holds them whole) [1]",
        )
        sub.add_argument(
            "--responses",
            type=int,
            default=2,
            help="reward/dpo: rows per preference group (2: pairs) [2]",
        )
        skip = NOT_FOR_REWARD if stage in ("reward", "dpo") else ()
        for cls in STAGE_CONFIGS[stage]:
            own = skip if cls is TrainConfig else ()  # reward/dpo: LoRA from their own config
            add_dataclass_options(sub, cls, f"{stage} ({cls.__name__})", skip=own)
        sub.set_defaults(run=run_plan)


def model_shape(path: Path) -> tuple[PaLMConfig, str]:
    """(architecture, dtype the weights are stored in) from a config.json, without weights: a
    Hugging Face config says its dtype; a palm_rlhf checkpoint's safetensors header does."""
    directory = None
    if path.is_dir():
        directory = resolve_run_dir(path)
        path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    raw = read_json(path)
    if "model_type" in raw:
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        return palm_config_from_hf(raw), dtype
    dtype = None
    if directory is not None and (directory / WEIGHTS_NAME).is_file():
        names = ("token_emb.weight", "trunk.token_emb.weight")  # a PaLM, or a reward model
        dtype = stored_dtype(directory / WEIGHTS_NAME, names)
    return PaLMConfig.from_dict(raw), dtype or "float32"


def settings_from_args(args: argparse.Namespace, weights_dtype: str) -> PlanSettings:
    skip = NOT_FOR_REWARD if args.stage in ("reward", "dpo") else ()
    configs = [
        dataclass_from_args(cls, args, skip=skip if cls is TrainConfig else ())
        for cls in STAGE_CONFIGS[args.stage]
    ]
    first = configs[0]
    common: dict[str, Any] = dict(
        stage=args.stage,
        stored_dtype=weights_dtype if weights_dtype in PLANNED_DTYPES else "float32",
        mixed_precision=first.mixed_precision,
        activation_checkpointing=first.activation_checkpointing,
        processes=args.processes,
        fsdp=first.fsdp,
    )  # fmt: skip
    if args.stage in ("pretrain", "sft", "reward", "dpo"):
        common.update(batch_size=first.batch_size, seq_len=first.seq_len, responses=args.responses)
        common["base_dtype"] = first.base_dtype
        if args.stage in ("pretrain", "sft"):  # 0: a full fine-tune
            common.update(lora_rank=first.lora_rank, lora_alpha=first.lora_alpha)
        if args.stage == "reward":
            reward = configs[1]
            common.update(lora_rank=reward.lora_rank, lora_alpha=reward.lora_alpha,
                          full_finetune=reward.lora_rank == 0)  # fmt: skip
        if args.stage == "dpo":
            dpo = configs[1]
            common.update(lora_rank=dpo.lora_rank, lora_alpha=dpo.lora_alpha,
                          full_finetune=dpo.full_finetune)  # fmt: skip
        return PlanSettings(**common)
    rows = first.rollout_batch_size if args.stage == "ppo" else (
        first.prompts_per_iteration * first.group_size
    )  # fmt: skip
    return PlanSettings(
        **common,
        rollout_rows=rows,
        max_prompt_tokens=first.max_prompt_tokens,
        max_new_tokens=first.max_new_tokens,
        minibatch_size=first.minibatch_size,
        lora_rank=first.lora_rank,
        lora_alpha=first.lora_alpha,
        full_finetune=first.full_finetune,
        kl_coef=first.kl_coef,
        base_dtype=first.base_dtype,
        sample_gathered=first.sample_gathered,
    )


def run_plan(args: argparse.Namespace) -> None:
    device_memory = parse_size(args.device_memory)
    config, weights_dtype = model_shape(args.model)
    settings = settings_from_args(args, weights_dtype)
    plan = plan_memory(config, settings)
    fits = plan.peak_bytes <= device_memory
    if args.json:
        out = {"stage": args.stage, "device_memory_bytes": device_memory, "fits": fits,
               "settings": settings.__dict__, **plan.as_dict()}  # fmt: skip
        print(json.dumps(out, indent=2))
        return
    gb = 1e9
    print(
        f"plan: one {args.stage} step, {plan.parameters / 1e9:.2f}B parameters, vocabulary "
        f"{config.num_tokens:,}, weights stored in {weights_dtype}"
    )
    if settings.processes > 1 or settings.fsdp:
        how = "sharded with FSDP2: one process's share" if settings.fsdp else (
            "DDP: each process holds the whole model, as one process does")  # fmt: skip
        print(f"{settings.processes} processes, {how}")
    print(f"peak {plan.peak_bytes / gb:.2f} GB during {plan.phase}; device "
          f"{device_memory / gb:.1f} GB: {'fits' if fits else 'DOES NOT FIT'}")  # fmt: skip
    for name, size in plan.categories.items():
        print(f"  {name:38s} {size / gb:8.2f} GB")
    print(
        f"  {'(of the activations: one logits chunk)':38s} {plan.logits_chunk_bytes / gb:8.2f} GB"
    )
    float16_base = settings.stored_dtype == "float16" and settings.base_dtype == "stored"
    if not settings.trains_every_weight and float16_base and settings.mixed_precision == "bf16":
        print(f"note: {AUTOCAST_COPIES}")
    others = ", ".join(f"{k} {v / gb:.2f} GB" for k, v in plan.phases.items())
    print(f"phases: {others}; not counted: allocator slack, CUDA context and workspaces")
