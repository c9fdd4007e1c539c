"""Tiny random Cohere / Cohere2 models built in-process (nothing downloaded), saved the way
the hub holds real ones: config.json, sharded safetensors with an index, tokenizer.json,
tokenizer_config.json (with a chat template), generation_config.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bpe import VOCAB, write_tokenizer

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "cohere": dict(kind="cohere"),
    "cohere_qk_norm": dict(kind="cohere", use_qk_norm=True),
    "cohere2_sliding": dict(kind="cohere2", sliding_window=6),
    "gqa": dict(kind="cohere", num_attention_heads=4, num_key_value_heads=2),
    "ff_ratio": dict(kind="cohere", intermediate_size=50),  # 50 / 32: no integer multiple
    "logit_scale": dict(kind="cohere", logit_scale=0.25),
}


def hf_config(kind: str = "cohere", **overrides):
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4 if kind == "cohere2" else 2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        logit_scale=1.0,
        rope_theta=10000.0,
        layer_norm_eps=1e-5,
        bos_token_id=2,
        eos_token_id=5,
        pad_token_id=0,
    )
    values.update(overrides)
    cls = transformers.Cohere2Config if kind == "cohere2" else transformers.CohereConfig
    return cls(**values)


def tiny_hf_model(kind: str = "cohere", seed: int = 0, **overrides):
    """A random CohereForCausalLM / Cohere2ForCausalLM in float32 with weights large enough
    that its logits separate tokens clearly (the default init gives near-uniform ones)."""
    torch.manual_seed(seed)
    config = hf_config(kind, **overrides)
    cls = transformers.Cohere2ForCausalLM if kind == "cohere2" else transformers.CohereForCausalLM
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "norm" not in name:
                param.normal_(0, 0.25)
            else:  # norm weights: around 1, not exactly 1, so a dropped one shows
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


def save_hf_dir(model, directory: Path, chat_template: bool = True, shard: str = "20KB") -> Path:
    """save_pretrained in small shards (so the index path is exercised) + tokenizer files."""
    model.save_pretrained(directory, max_shard_size=shard)
    return write_tokenizer(directory, chat_template)


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids transformers' generate gives a left-padded batch (and ours use)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
