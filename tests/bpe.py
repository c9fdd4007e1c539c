"""A tiny byte-level BPE with Cohere's special tokens and a Cohere-style chat template, trained
in-process on two stdlib files (well under a second; nothing downloaded)."""

from __future__ import annotations

import json
import sysconfig
from functools import cache
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")

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


def write_tokenizer(directory: Path, chat_template: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(chat_template).items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory
