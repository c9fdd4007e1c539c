"""`HFTokenizer`: our `Tokenizer` protocol over a Hugging Face `tokenizer.json`.

Built on the `tokenizers` package and, for chat templates, jinja2 (both in the `hf` extra).
It reads the same files transformers reads: `tokenizer.json` for the vocabulary,
`tokenizer_config.json` / `special_tokens_map.json` for bos, eos and pad,
`generation_config.json` for the other ids that end a turn, and the chat template from
`chat_template.jinja` or `tokenizer_config.json`. It is built from the files' texts, which is
how a checkpoint carries them (`PaLM.tokenizer_files`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import torch

from .base import ByteTokenizer, pad_sequences


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(
            f"this checkpoint's tokenizer needs the {module!r} package: pip install 'palm-rlhf[hf]'"
        ) from None


class HFTokenizer:
    """A Hugging Face fast tokenizer with distinct pad, bos and eos, and the ids that stop
    generation (`stop_ids`: eos and, from generation_config.json, e.g. a chat model's
    end-of-turn token). `vocab_size` is the largest id + 1 (a model may have more embeddings
    than its tokenizer has tokens: Cohere's 256,000 hold about 255,000)."""

    def __init__(self, files: dict[str, str]) -> None:
        if "tokenizer.json" not in files:
            raise ValueError("a Hugging Face tokenizer needs tokenizer.json")
        tokenizers = _require("tokenizers")
        self.files = dict(files)
        try:
            self.backend = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
        except Exception as error:  # the Rust side raises its own exception type
            raise ValueError(f"tokenizer.json: not a valid tokenizers file ({error})") from None
        self.config = self._json("tokenizer_config.json")
        self.special_tokens = self._special_tokens()
        generation = self._json("generation_config.json")
        self.vocab_size = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id = self._id("bos", generation)
        self.eos_id = self._id("eos", generation)
        self.pad_id = self._id("pad", generation)
        if self.pad_id in (self.eos_id, self.bos_id):
            raise ValueError(
                "tokenizer: pad_token must differ from bos and eos, or masking padding would "
                "mask the tokens that start and end every sequence"
            )
        extra = generation.get("eos_token_id")
        extra = extra if isinstance(extra, list) else [] if extra is None else [extra]
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *extra]))
        self.chat_template = self._chat_template()

    def _json(self, name: str) -> dict[str, Any]:
        text = self.files.get(name)
        if text is None:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{name}: expected a JSON object")
        return data

    def _special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, pad_token, ... as strings: tokenizer_config.json first, then
        special_tokens_map.json (each may give a string or {"content": ...})."""
        found: dict[str, str] = {}
        for source in (self._json("special_tokens_map.json"), self.config):
            for key, value in source.items():
                if key.endswith("_token") and isinstance(value, dict):
                    value = value.get("content")
                if key.endswith("_token") and isinstance(value, str):
                    found[key] = value
        return found

    def _id(self, role: str, generation: dict[str, Any]) -> int:
        token = self.special_tokens.get(f"{role}_token")
        if token is not None:
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer: {role}_token {token!r} is not in the vocabulary")
            return token_id
        token_id = generation.get(f"{role}_token_id")
        if isinstance(token_id, list) and token_id:
            token_id = token_id[0]
        if isinstance(token_id, int) and 0 <= token_id < self.vocab_size:
            return token_id
        raise ValueError(
            f"tokenizer: no {role}_token in tokenizer_config.json or special_tokens_map.json "
            f"(palm_rlhf needs distinct pad, bos and eos tokens)"
        )

    def _chat_template(self) -> str | None:
        if "chat_template.jinja" in self.files:
            return self.files["chat_template.jinja"]
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one is for chatting
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    # ----------------------------------------------------------------------------- protocol

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> ids, without the tokenizer's own post-processing (which would add its bos
        wherever it likes): bos and eos are added here, where our layouts say."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text with special tokens dropped (as ByteTokenizer drops pad, bos, eos).

        Ids at or above vocab_size decode to nothing: a model may have more embeddings than
        its tokenizer has tokens (Cohere pads about 255,000 tokens to 256,000 rows), and a
        sampled response can contain one, as it can in transformers, which skips them too."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if any(i < 0 for i in ids):
            raise ValueError(f"negative token id {min(ids)}")
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def encode_batch(
        self,
        texts: Sequence[str],
        padding_side: str = "left",
        add_bos: bool = False,
        add_eos: bool = False,
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        return pad_sequences(rows, self.pad_id, padding_side, max_length)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------- chat

    def render_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as text, through the chat template, rendered the way transformers'
        apply_chat_template renders it (a sandboxed jinja2 environment with trim_blocks and
        lstrip_blocks, `raise_exception`, `strftime_now` and a `tojson` filter)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        _require("jinja2")
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        template = environment.from_string(self.chat_template)
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def encode_chat(self, text: str) -> list[int]:
        """A rendered conversation -> ids: its special tokens (the template writes bos and the
        turn markers as text) become their ids; nothing is added."""
        return self.backend.encode(text, add_special_tokens=False).ids


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, which the
    tokenizers ByteLevel pre-tokenizer and decoder use: printable Latin-1 bytes map to
    themselves, the rest to the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer_files(max_seq_len: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json of a tokenizer that encodes exactly as
    `ByteTokenizer`: a byte-level BPE without merges (id b = byte b) and pad, bos, eos as
    special tokens 256, 257, 258."""
    tokenizers = _require("tokenizers")
    byte_tokenizer = ByteTokenizer()
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    # No regex split, no prefix space: every byte of the text becomes one token, as ours.
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False
    )
    backend.decoder = tokenizers.decoders.ByteLevel()
    names = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}
    backend.add_special_tokens(list(names.values()))
    for role, token in names.items():
        if backend.token_to_id(token) != getattr(byte_tokenizer, f"{role}_id"):
            raise RuntimeError(f"byte tokenizer.json: {token} did not get ByteTokenizer's id")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "pad_token": names["pad"],
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": backend.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }
