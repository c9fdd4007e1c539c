"""`palm-rlhf import-hf` and `palm-rlhf export-hf`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..hf.convert import DTYPES, export_hf, import_hf

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_import_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-hf",
        help="convert a Hugging Face Cohere / Cohere2 model into a palm_rlhf checkpoint",
        description="Convert a downloaded Cohere (Command-R, Aya 23, Aya Expanse) or Cohere2 "
        "(Command R7B, tiny-aya) directory (config.json, safetensors shards, tokenizer.json) "
        "into a checkpoint every palm-rlhf stage reads. Streams tensor by tensor; other "
        "architectures and unknown config options are refused by name.",
    )
    parser.add_argument("hf_dir", type=Path, help="the Hugging Face model directory")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="store the weights in this dtype [as stored: bf16 stays bf16]; float32 for CPUs, "
        "where bf16 matrix products are slow",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a checkpoint already in --out"
    )
    parser.set_defaults(run=run_import)


def run_import(args: argparse.Namespace) -> None:
    _refuse_existing(args.out, args.overwrite)
    config = import_hf(args.hf_dir, args.out, DTYPES.get(args.dtype))
    print(
        f"imported {args.hf_dir} -> {args.out}: dim={config.dim}, depth={config.depth}, "
        f"heads={config.heads}/{config.kv_heads}, vocab={config.num_tokens}"
    )


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-hf",
        help="convert a palm_rlhf checkpoint into a Hugging Face Cohere / Cohere2 model",
        description="Write CKPT (a policy, a run directory) as a directory transformers and "
        "vLLM load: config.json, generation_config.json, sharded safetensors with an index and "
        "the tokenizer files. A LoRA adapter is folded into the weights.",
    )
    parser.add_argument("checkpoint", type=Path, help="palm_rlhf checkpoint or run directory")
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument(
        "--lora-scope",
        default=None,
        help="the LoRA scope to fold in, when the checkpoint has several [its only one]",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=None, help="dtype of the exported weights"
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard, e.g. 5GB or 500MB, as transformers' max_shard_size [5GB]",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an export already in --out"
    )
    parser.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    _refuse_existing(args.out, args.overwrite)
    config = export_hf(
        args.checkpoint,
        args.out,
        lora_scope=args.lora_scope,
        dtype=DTYPES.get(args.dtype),
        max_shard_bytes=parse_size(args.max_shard_size),
    )
    print(f"exported {args.checkpoint} -> {args.out} ({config['architectures'][0]})")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '20KB' (powers of 1000, as transformers reads them) or bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size: {text!r} is not a size like 5GB or 500MB")
    unit = (match.group(2) or "B").upper()
    size = int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])
    if size <= 0:
        raise ValueError(f"--max-shard-size: must be positive, got {text!r}")
    return size


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; give --overwrite to replace what it holds")
