"""Supervised fine-tuning pairs: the JSONL of {"prompt", "response"} records and the one function
that lays a pair out as `[bos] + prompt + response + [eos]` with the loss on the response only
(`sft_example`, also used by DPO).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..storage.text_files import decode_utf8, parse_jsonl, read_bytes, string_field
from ..tokenizers.base import Tokenizer, pad_sequences


class SFTDataset(Dataset):
    """Supervised fine-tuning pairs from JSONL lines {"prompt": str, "response": str}.

    tokens = [bos] + prompt + response + [eos]; loss_mask is True exactly on the response and
    eos (InstructGPT SFT trains on demonstrations, not prompts). Too long: the prompt loses
    tokens from its left (the end of a prompt matters most); a response that alone does not
    fit is cut at its end, the prompt dropped, and no eos added, since the response did not
    end there.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, max_seq_len: int) -> None:
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (bos + one token), got {max_seq_len}")
        path = Path(path)
        text = decode_utf8(path, read_bytes(path))
        self.examples: list[tuple[list[int], list[bool]]] = []
        self.response_bytes: list[int] = []  # UTF-8 size of each response, for bits per byte
        for lineno, obj in parse_jsonl(path, text):
            prompt = tokenizer.encode(string_field(path, lineno, obj, "prompt"))
            response_text = string_field(path, lineno, obj, "response")
            response = tokenizer.encode(response_text)
            self.examples.append(sft_example(tokenizer, prompt, response, max_seq_len))
            self.response_bytes.append(len(response_text.encode("utf-8")))
        if not self.examples:
            raise ValueError(f"{path}: no examples")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        tokens, loss_mask = self.examples[index]
        return {
            "tokens": torch.tensor(tokens, dtype=torch.long),  # (n,)
            "loss_mask": torch.tensor(loss_mask, dtype=torch.bool),  # (n,)
        }


def sft_example(
    tokenizer: Tokenizer, prompt: list[int], response: list[int], max_seq_len: int
) -> tuple[list[int], list[bool]]:
    """The policy's row for one (prompt, response), as `SFTDataset` documents it: (tokens,
    loss_mask). The one owner of this layout: SFT trains on it and DPO scores responses on it.
    `prompt` and `response` hold token ids without bos or eos."""
    if len(response) + 2 > max_seq_len:
        response = response[: max_seq_len - 1]
        return [tokenizer.bos_id, *response], [False] + [True] * len(response)
    keep = max_seq_len - 2 - len(response)
    prompt = prompt[len(prompt) - keep :] if len(prompt) > keep else prompt
    tokens = [tokenizer.bos_id, *prompt, *response, tokenizer.eos_id]
    return tokens, [False] * (1 + len(prompt)) + [True] * (len(response) + 1)


def collate_sft(batch: Sequence[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad SFT items to (b, n): tokens long, mask (True = real token) and loss_mask bool.

    Use as `DataLoader(..., collate_fn=functools.partial(collate_sft, pad_id=tok.pad_id))`.
    """
    tokens, mask = pad_sequences([item["tokens"].tolist() for item in batch], pad_id, "right")
    loss_mask = torch.zeros_like(mask)
    for row, item in enumerate(batch):
        loss_mask[row, : item["loss_mask"].numel()] = item["loss_mask"]
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
