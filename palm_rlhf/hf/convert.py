"""`import_hf` and `export_hf`: Cohere / Cohere2 directories in and out, streamed.

Both read tensors from memory-mapped safetensors and write each converted tensor as soon as it
is computed (`checkpoint.write_safetensors`), so a conversion holds about one layer in memory,
never a whole model. Both write their output directory atomically (built beside it, swapped
in), so a failed conversion leaves nothing half-written where the user looks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import LoRAConfig, PaLMConfig
from ..storage.atomic import read_json
from ..storage.checkpoint import WEIGHTS_NAME, resolve_run_dir, save_planned_dir
from ..storage.safetensors import TensorPlan
from ..tokenizers.files import TOKENIZER_FILES, read_tokenizer_files
from ..tokenizers.hf import HFTokenizer, byte_tokenizer_files
from .config import hf_config_from_palm, palm_config_from_hf
from .weights import INDEX_NAME, SafetensorsDir, hf_plans, palm_plans

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size, "5GB"


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> PaLMConfig:
    """Convert a Cohere / Cohere2 directory (config.json, model.safetensors or shards with an
    index, tokenizer.json and its companions) into a palm_rlhf checkpoint that
    `PaLM.from_pretrained` loads. Weights keep their stored dtype unless `dtype` is given
    (float32 for CPUs, where bfloat16 matmuls are slow). Returns the model's config."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (is this a Hugging Face model dir?)")
    try:
        config = palm_config_from_hf(read_json(hf_dir / "config.json"))
    except ValueError as error:
        raise ValueError(f"{hf_dir}/{error}") from None
    tokenizer_files = read_tokenizer_files(hf_dir)
    tokenizer = HFTokenizer(tokenizer_files)  # refuses a tokenizer our stages cannot use
    if tokenizer.vocab_size > config.num_tokens:
        raise ValueError(
            f"{hf_dir}: the tokenizer has ids up to {tokenizer.vocab_size - 1}, the model only "
            f"{config.num_tokens} embeddings"
        )
    plans = palm_plans(config, SafetensorsDir(hf_dir), dtype)
    files = {"config.json": config.to_dict(), **tokenizer_files}
    owned = ["lora.json", *TOKENIZER_FILES]
    with _progress(plans, f"import {hf_dir.name}", show_progress) as tracked:
        save_planned_dir(out_dir, {WEIGHTS_NAME: tracked}, files, owned)
    return config


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    lora_scope: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Convert a palm_rlhf PaLM checkpoint (or run directory) into a Cohere / Cohere2
    directory that transformers and vLLM load: config.json, generation_config.json, sharded
    safetensors with model.safetensors.index.json, and the tokenizer's files (a byte-tokenizer
    checkpoint gets an equivalent tokenizer.json). A LoRA scope is folded into the weights: the
    checkpoint's only scope, or `lora_scope` when it has several. Returns the config.json."""
    directory = resolve_run_dir(Path(checkpoint))
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a palm_rlhf checkpoint)")
    if (directory / "reward_config.json").is_file():
        raise ValueError(
            f"{directory}: a reward model; export-hf writes causal LMs (CohereForCausalLM)"
        )
    config = PaLMConfig.from_dict(read_json(directory / "config.json"))
    lora = _scope_to_merge(directory, lora_scope)
    source = SafetensorsDir(directory)
    stored = source.shape_dtype("token_emb.weight")[1]
    dtype = dtype or stored
    tokenizer_files = read_tokenizer_files(directory) or byte_tokenizer_files(config.max_seq_len)
    tokenizer = HFTokenizer(tokenizer_files)
    token_ids = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"{directory}: weights in {dtype}; export as one of {sorted(DTYPES)}")
    dtype_name = names[dtype]
    hf_config = hf_config_from_palm(config, token_ids, dtype_name)
    plans = hf_plans(config, source, lora, dtype)
    shards, index = _shard(plans, max_shard_bytes)
    generation = {
        "_from_model_config": False,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": list(tokenizer.stop_ids),
        "pad_token_id": tokenizer.pad_id,
    }
    files = {
        "config.json": hf_config,
        INDEX_NAME: index,
        **tokenizer_files,
        "generation_config.json": tokenizer_files.get("generation_config.json", generation),
    }
    out_dir = Path(out_dir)
    owned = [p.name for p in out_dir.glob("model-*.safetensors") if SHARD_PATTERN.fullmatch(p.name)]
    owned += list(TOKENIZER_FILES)
    with _progress(plans, f"export {directory.name}", show_progress) as tracked:
        tracked_shards = {name: {k: tracked[k] for k in shard} for name, shard in shards.items()}
        save_planned_dir(out_dir, tracked_shards, files, owned)
    return hf_config


def _scope_to_merge(directory: Path, lora_scope: str | None) -> tuple[str, LoRAConfig] | None:
    scopes = read_json(directory / "lora.json") if (directory / "lora.json").is_file() else {}
    if lora_scope is not None:
        if lora_scope not in scopes:
            raise ValueError(
                f"--lora-scope {lora_scope!r}: {directory} has LoRA scopes {sorted(scopes)}"
            )
        return lora_scope, LoRAConfig(**scopes[lora_scope])
    if len(scopes) > 1:
        raise ValueError(
            f"{directory} has LoRA scopes {sorted(scopes)}: name the one to fold into the "
            "exported weights with --lora-scope"
        )
    if scopes:
        ((name, raw),) = scopes.items()
        return name, LoRAConfig(**raw)
    return None


def _shard(
    plans: dict[str, TensorPlan], max_shard_bytes: int
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Split the tensors, in order, into shards of at most max_shard_bytes (a larger tensor
    gets a shard of its own), named as transformers names them, and the index that maps each
    tensor to its shard."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[list[str]] = [[]]
    size = total = 0
    for name, plan in plans.items():
        nbytes = plan.dtype.itemsize * int(torch.Size(plan.shape).numel())
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
        total += nbytes
    count = len(groups)
    shards = {
        f"model-{k + 1:05d}-of-{count:05d}.safetensors": group for k, group in enumerate(groups)
    }
    weight_map = {name: file for file, group in shards.items() for name in group}
    return shards, {"metadata": {"total_size": total}, "weight_map": weight_map}


@contextmanager
def _progress(
    plans: dict[str, TensorPlan], description: str, show: bool
) -> Iterator[dict[str, TensorPlan]]:
    """The plans, each advancing a tqdm bar when its tensor is produced."""
    bar = tqdm(total=len(plans), desc=description, disable=not show)

    def tracked(plan: TensorPlan) -> TensorPlan:
        def produce() -> torch.Tensor:
            tensor = plan.produce()
            bar.update(1)
            return tensor

        return plan._replace(produce=produce)

    try:
        yield {name: tracked(plan) for name, plan in plans.items()}
    finally:
        bar.close()
