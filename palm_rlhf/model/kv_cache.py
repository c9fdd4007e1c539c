"""Preallocated key/value cache for incremental decoding.

Only the `kv_heads` key/value heads are stored (one by default): with multi-query attention the
cache is `heads` times smaller than a multi-head one, which is why PaLM chose it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..config import PaLMConfig


class KVCache:
    """Keys and values of every layer for positions [0, length), plus which were real tokens.

    keys, values: (depth, b, kv_heads, max_len, dim_head); key_mask: (b, max_len), True = real.
    next_position: (b,) the rotary position the next real token of each row gets, so that
    left padding never shifts positions.
    """

    def __init__(
        self,
        config: PaLMConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        max_len = config.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= config.max_seq_len:
            raise ValueError(f"cache max_len must be in [1, {config.max_seq_len}], got {max_len}")
        shape = (config.depth, batch_size, config.kv_heads, max_len, config.dim_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.next_position = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0
        self.max_len = max_len
        self.batch_size = batch_size
        self.has_padding = False  # any padding key so far (decided on the host, see PaLM)

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        return self.keys[index], self.values[index]

    def check_fits(self, batch_size: int, num_new: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows, got a batch of {batch_size}")
        if self.length + num_new > self.max_len:
            raise ValueError(
                f"cache overflow: {self.length} cached + {num_new} new tokens > "
                f"max_len {self.max_len}"
            )

    def note_padding(self, padded: bool) -> bool:
        """Record whether the incoming tokens include padding; return whether any cached or
        incoming key is padding."""
        self.has_padding = self.has_padding or padded
        return self.has_padding

    def write_mask(self, mask: Tensor) -> Tensor:
        """Record which of the n incoming tokens are real; return the key mask (b, length + n)
        that their attention sees."""
        n = mask.shape[1]
        self.key_mask[:, self.length : self.length + n] = mask
        return self.key_mask[:, : self.length + n]

    def advance(self, mask: Tensor) -> None:
        """Commit a forward of mask (b, n) whose keys the layers wrote at [length, length + n)."""
        self.next_position += mask.sum(dim=1)
        self.length += mask.shape[1]

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on: the next forward writes at `length`. A chat
        whose new turn re-tokenizes differently from what was cached re-reads from there
        instead of from the start."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.key_mask[:, length:] = False
        self.next_position = self.key_mask[:, :length].sum(dim=1)
        self.length = length

    def gather_rows(self, index: Tensor) -> KVCache:
        """A new cache whose row i is a copy of this cache's row index[i] (index: (b',) long).
        Prompts sampled several times are prefilled once and copied to each of their rows."""
        gathered = copy.copy(self)  # the scalar state (length, max_len, has_padding) as is
        gathered.keys = self.keys.index_select(1, index)
        gathered.values = self.values.index_select(1, index)
        gathered.key_mask = self.key_mask.index_select(0, index)
        gathered.next_position = self.next_position.index_select(0, index)
        gathered.batch_size = index.shape[0]
        return gathered
