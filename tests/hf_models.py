"""Tiny random Cohere / Cohere2 models and a tiny BPE, built in-process (nothing downloaded),
saved the way the hub holds real ones: config.json, sharded safetensors with an index,
tokenizer.json, tokenizer_config.json (with a chat template), generation_config.json."""

from __future__ import annotations

import json
import sysconfig
from functools import cache
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")
tokenizers = __import__("pytest").importorskip("tokenizers")

SPECIAL = [
    "<PAD>",
    "<UNK>",
    "<BOS_TOKEN>",
    "<EOS_TOKEN>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
]
# A Cohere-style chat template (turn markers as special tokens), written for these tests.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set role = '<|SYSTEM_TOKEN|>' %}"
    "{% elif message['role'] == 'user' %}{% set role = '<|USER_TOKEN|>' %}"
    "{% elif message['role'] == 'assistant' %}{% set role = '<|CHATBOT_TOKEN|>' %}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|START_OF_TURN_TOKEN|>' + role + message['content'] + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)
VOCAB = 320  # the model's embeddings; the BPE uses a few less, as Cohere's does


def training_text() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "shlex.py")]


@cache
def tiny_bpe_json() -> str:
    """A byte-level BPE of about 300 tokens trained on two stdlib files (well under a second)."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB - 12,
        special_tokens=SPECIAL,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(training_text(), trainer)
    return model.to_str()


def tokenizer_files(chat_template: bool = True) -> dict[str, str]:
    backend = tokenizers.Tokenizer.from_str(tiny_bpe_json())
    config = {
        "tokenizer_class": "CohereTokenizer",
        "bos_token": "<BOS_TOKEN>",
        "eos_token": "<|END_OF_TURN_TOKEN|>",
        "pad_token": "<PAD>",
        "unk_token": "<UNK>",
        "model_max_length": 128,
    }
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    generation = {
        "bos_token_id": backend.token_to_id("<BOS_TOKEN>"),
        "eos_token_id": [backend.token_to_id(t) for t in ("<|END_OF_TURN_TOKEN|>", "<EOS_TOKEN>")],
        "pad_token_id": backend.token_to_id("<PAD>"),
    }
    return {
        "tokenizer.json": tiny_bpe_json(),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "generation_config.json": json.dumps(generation, indent=2),
    }


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
    for name, text in tokenizer_files(chat_template).items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids transformers' generate gives a left-padded batch (and ours use)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
