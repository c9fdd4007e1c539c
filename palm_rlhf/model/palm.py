"""PaLM decoder (Chowdhery et al. 2022): embed -> parallel blocks -> norm -> tied logits.

einops legend: b batch, n new positions, m key positions (cached + new), d model dim,
v vocabulary. Masks: True = real token.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from beartype import beartype
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import LoRAConfig, PaLMConfig
from ..losses.lm import lm_loss_from_stats, shift_targets
from ..losses.logprobs import TokenStats, token_stats_from_hidden
from ..storage.atomic import read_json
from ..storage.checkpoint import load_model_dir, resolve_run_dir, save_model_dir
from ..storage.safetensors import tensor_digest
from ..tokenizers.files import TOKENIZER_FILES
from .kv_cache import KVCache
from .layers import ParallelBlock, Rotary
from .lora import add_lora, check_scope

CHECKPOINT_JSON = ("config.json", "lora.json")  # the JSON files of a PaLM checkpoint
BASE_JSON = "base.json"  # the base weights' digest (written by every save; optional on load)
BASE_DIGEST_COVERS = "every tensor but the LoRA adapters: names, dtypes, shapes and bytes"


def read_base_digest(directory: str | Path) -> str | None:
    """The base weights' digest a checkpoint (or a run directory's latest) records, read
    without its weights; None for a checkpoint written before digests were."""
    path = resolve_run_dir(Path(directory)) / BASE_JSON
    return read_json(path).get("digest") if path.is_file() else None


class PaLM(nn.Module):
    """The PaLM decoder-only transformer.

    forward(tokens (b, n), mask=None, positions=None, cache=None, lora_scope=None) -> (b, n, v)

    - mask (b, n) bool marks real tokens; padded rows (left or right) get positions counted
      over real tokens only, so padding never changes a real token's output.
    - cache: a `KVCache` from `new_cache`; the call appends these n tokens after the cached ones.
    - lora_scope: the name of an adapter scope to apply, or None for the base model.
    """

    @beartype
    def __init__(self, config: PaLMConfig) -> None:
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.rotary = Rotary(config)
        self.blocks = nn.ModuleList(ParallelBlock(config, i) for i in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=False)
        self.lora_configs: dict[str, LoRAConfig] = {}
        # The tokenizer this model reads, as the texts of its files (tokenizer.TOKENIZER_FILES;
        # empty: the byte tokenizer). They travel with the model: every checkpoint saved from
        # it holds them, so no stage can pair the weights with another vocabulary.
        self.tokenizer_files: dict[str, str] = {}
        # Recompute each block's activations in backward instead of keeping them (a training
        # choice, not the architecture: not in the config, off by default).
        self.activation_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.token_emb.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.fused_proj.weight, std=std)
            # GPT-2's residual scaling: two writes into the stream per layer.
            for out_proj in (block.attn_out, block.ff_out):
                nn.init.normal_(out_proj.weight, std=std / (2 * self.config.depth) ** 0.5)

    # ----------------------------------------------------------------------------- forward

    def forward(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        lora_scope: str | None = None,
        validate_ids: bool = True,
        targets: Tensor | None = None,
        temperature: float = 1.0,
        entropy: bool = False,
        last_only: bool = False,
    ) -> Tensor | TokenStats:
        """Logits (b, n, v); or, given targets (b, k), the next tokens of the LAST k positions,
        their `TokenStats` (log-probs, log Z, entropy if asked) at `temperature`, computed
        through the output layer in chunks so no (b, n, v) tensor exists (training and scoring
        at a 256,000-token vocabulary). Either way the call goes through forward, so a DDP
        wrapper's gradient hooks run. last_only: the logits of the last position, (b, 1, v), all
        a sampler reads (a prefill of a long prompt at a 256,000-token vocabulary would
        otherwise build b x n x v logits to keep one row of them)."""
        # The body, not the public forward_hidden: a wrapper that gathers sharded weights
        # around each entry point (FSDP2) would free them again before the logits below.
        hidden = self._hidden(tokens, mask, positions, cache, lora_scope, validate_ids)
        if targets is None:
            return self.to_logits(hidden[:, -1:] if last_only else hidden)
        return token_stats_from_hidden(
            hidden[:, hidden.shape[1] - targets.shape[1] :],
            self.token_emb.weight,
            targets,
            scale=self.config.logit_scale,
            temperature=temperature,
            entropy=entropy,
        )

    def to_logits(self, hidden: Tensor) -> Tensor:
        """Tied output embedding: logits = logit_scale * hidden @ token_emb^T."""
        logits = F.linear(hidden, self.token_emb.weight)
        return logits if self.config.logit_scale == 1.0 else logits * self.config.logit_scale

    def forward_hidden(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        lora_scope: str | None = None,
        validate_ids: bool = True,
    ) -> Tensor:
        """The final normalised hidden states (b, n, d); reward and value heads read these.

        validate_ids=False skips the check that every id lies in the vocabulary, which reads
        the ids' min and max back to the host: `generate` validates its prompts once and then
        feeds back ids it sampled itself, so on a GPU a decoding step never waits for the host.
        Masks stay on the device: whether a batch has padding is read once, when a mask is
        given (a prompt), and a cache remembers it for the decoding steps that follow.
        """
        return self._hidden(tokens, mask, positions, cache, lora_scope, validate_ids)

    def _hidden(
        self,
        tokens: Tensor,
        mask: Tensor | None,
        positions: Tensor | None,
        cache: KVCache | None,
        lora_scope: str | None,
        validate_ids: bool,
    ) -> Tensor:
        given_mask = mask
        mask = self._validate(tokens, mask, positions, cache, lora_scope, validate_ids)
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = self._positions(tokens, mask, cache)
        padded = given_mask is not None and not bool(mask.all())
        if cache is not None:
            padded = cache.note_padding(padded)
        key_mask = cache.write_mask(mask) if cache is not None else mask
        # (attn_mask, is_causal) for each kind of layer: every layer is "full" unless the
        # config makes some "sliding".
        masks = {"full": self._attention_mask(key_mask, tokens.shape[1], past, padded)}
        if "sliding" in self.config.layer_types:
            masks["sliding"] = self._sliding_mask(masks["full"], key_mask, tokens.shape[1], past)
        rotary = self.rotary(positions)

        x = self.token_emb(tokens)  # (b, n, d)
        # Only a pass that will run backward keeps activations worth dropping; a cached pass
        # (generation) is always without gradients and writes the cache as it goes.
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for index, block in enumerate(self.blocks):
            cache_layer = cache.layer(index) if cache is not None else None
            attn_mask, is_causal = masks[block.attention]
            if recompute:
                # Non-reentrant: works with autocast, LoRA scopes, inputs without gradients
                # (a frozen embedding) and FSDP2, and keeps only x for each block.
                x = checkpoint(
                    block, x, rotary, attn_mask, is_causal, None, past, lora_scope,
                    use_reentrant=False,
                )  # fmt: skip
            else:
                x = block(x, rotary, attn_mask, is_causal, cache_layer, past, lora_scope)
        if cache is not None:
            cache.advance(mask)
        return self.norm(x)

    def _validate(
        self,
        tokens: Tensor,
        mask: Tensor | None,
        positions: Tensor | None,
        cache: KVCache | None,
        lora_scope: str | None,
        validate_ids: bool,
    ) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.long, torch.int):
            raise ValueError("tokens must be an integer tensor of token ids")
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(
                f"tokens must have shape (batch, seq_len>0), got {tuple(tokens.shape)}"
            )
        if validate_ids:
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.config.num_tokens:
                bad = low if low < 0 else high
                raise ValueError(
                    f"token id {bad} is outside the vocabulary [0, {self.config.num_tokens})"
                )
        b, n = tokens.shape
        past = cache.length if cache is not None else 0
        if past + n > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {past + n} exceeds max_seq_len {self.config.max_seq_len}"
            )
        if cache is not None:
            if not self.config.causal:
                raise ValueError("a KV cache needs a causal model (config.causal=True)")
            cache.check_fits(b, n)
        if mask is not None and tuple(mask.shape) != (b, n):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {(b, n)}")
        if positions is not None and tuple(positions.shape) != (b, n):
            raise ValueError(
                f"positions shape {tuple(positions.shape)} does not match tokens {(b, n)}"
            )
        check_scope(self, lora_scope)
        if mask is None:
            return torch.ones_like(tokens, dtype=torch.bool)
        return mask.bool()

    @staticmethod
    def _positions(tokens: Tensor, mask: Tensor, cache: KVCache | None) -> Tensor:
        """Rotary positions count real tokens only: a left-padded row starts at 0."""
        offsets = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (b, n)
        if cache is not None:
            offsets = offsets + cache.next_position[:, None]
        return offsets

    def _attention_mask(
        self, key_mask: Tensor, n: int, past: int, padded: bool
    ) -> tuple[Tensor | None, bool]:
        """(attn_mask (b, 1, n, m) or None, is_causal) for scaled_dot_product_attention.

        padded: whether any key is padding (known on the host, so nothing is read back here).
        Every query may always see itself, so padding queries (whose outputs are ignored) never
        meet an all-masked row, which would give NaN.
        """
        no_padding = not padded
        causal = self.config.causal
        if no_padding and (n == 1 or not causal):
            return None, False
        if no_padding and past == 0:
            return None, True
        m = key_mask.shape[1]
        query_pos = torch.arange(past, past + n, device=key_mask.device)[:, None]  # (n, 1)
        key_pos = torch.arange(m, device=key_mask.device)[None, :]  # (1, m)
        allowed = key_mask[:, None, None, :]  # (b, 1, 1, m)
        if causal:
            allowed = allowed & (key_pos <= query_pos)
        return allowed | (key_pos == query_pos), False

    def _sliding_mask(
        self, full: tuple[Tensor | None, bool], key_mask: Tensor, n: int, past: int
    ) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) of the sliding layers, given the full layers' `full`: a query
        at slot i sees the keys at slots (i - sliding_window, i], as Hugging Face's Cohere2
        does. Slots count padding, but a row's real tokens are contiguous, so a window of
        slots is a window of real tokens too."""
        window = self.config.sliding_window
        if past + n <= window:  # no key is old enough to fall out of any window
            return full
        m = key_mask.shape[1]
        query_pos = torch.arange(past, past + n, device=key_mask.device)[:, None]  # (n, 1)
        key_pos = torch.arange(m, device=key_mask.device)[None, :]  # (1, m)
        in_window = (key_pos <= query_pos) & (key_pos > query_pos - window)  # (n, m)
        allowed = key_mask[:, None, None, :] & in_window  # (b, 1, n, m)
        return allowed | (key_pos == query_pos), False

    # ----------------------------------------------------------------------------- helpers

    def set_activation_checkpointing(self, enabled: bool) -> PaLM:
        """Per block, keep only the block's input in a forward with gradients and recompute
        the rest in backward: activation memory of one block instead of all of them, for about
        a third more compute. Gradients are the same as without it."""
        self.activation_checkpointing = bool(enabled)
        return self

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.token_emb.weight
        return KVCache(self.config, batch_size, max_len, device=weight.device, dtype=weight.dtype)

    def loss(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        loss_mask: Tensor | None = None,
        lora_scope: str | None = None,
    ) -> Tensor:
        """Next-token cross-entropy (plus config.z_loss_weight * z-loss) on (b, n) tokens.

        A target counts when it is a real token (mask) and, if given, loss_mask is True at its
        position (e.g. response tokens only for SFT).
        """
        inputs, input_mask, targets = shift_targets(tokens, mask, loss_mask)
        stats = self(inputs, mask=input_mask, lora_scope=lora_scope, targets=targets)
        return lm_loss_from_stats(stats, targets, z_loss_weight=self.config.z_loss_weight)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def add_lora(
        self, scope: str, config: LoRAConfig | None = None, freeze_base: bool = True
    ) -> list[nn.Parameter]:
        return add_lora(self, scope, config, freeze_base)

    # ----------------------------------------------------------------------------- checkpoints

    def save_pretrained(
        self, directory: str | Path, scopes: Collection[str] | None = None, write: bool = True
    ) -> None:
        """Write config.json (+ lora.json), model.safetensors and the tokenizer's files,
        atomically. scopes: the adapter scopes to keep (None: all); a PPO policy that shares
        its base with the critic and reward scopes saves only its actor. A model sharded over
        processes is gathered a tensor at a time: every process calls this, one with write=True
        (`storage.checkpoint.save_model_dir`)."""
        state = self.state_dict()
        if scopes is not None:
            dropped = [f".adapters.{s}." for s in self.lora_configs if s not in scopes]
            state = {n: t for n, t in state.items() if not any(d in n for d in dropped)}
        save_model_dir(directory, state, self.checkpoint_json(scopes), write=write)

    def checkpoint_json(self, scopes: Collection[str] | None = None) -> dict[str, Any]:
        """The files of a checkpoint of this model besides its weights (name -> JSON object,
        or text written as it is; None = not written). base.json holds the base weights'
        digest: a later stage tells from the files alone whether two checkpoints share their
        base (PPO then holds one trunk for every role)."""
        lora = {
            name: cfg.__dict__
            for name, cfg in self.lora_configs.items()
            if scopes is None or name in scopes
        }
        tokenizer = {name: self.tokenizer_files.get(name) for name in TOKENIZER_FILES}
        return {
            "config.json": self.config.to_dict(),
            "lora.json": lora or None,
            BASE_JSON: {"digest": self.base_digest(), "of": BASE_DIGEST_COVERS},
            **tokenizer,
        }

    def base_tensors(self) -> dict[str, Tensor]:
        """The base weights: every tensor of the state dict but the LoRA adapters'."""
        return {n: t for n, t in self.state_dict().items() if ".adapters." not in n}

    def base_digest(self) -> str:
        """`tensor_digest` of the base weights (names, dtypes, shapes and bytes)."""
        return tensor_digest(self.base_tensors())

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> PaLM:
        """Load a `save_pretrained` directory; no pickle is ever read. The weights keep the
        file's dtype unless `dtype` is given (a bf16 checkpoint loads as bf16, never through
        float32); the tokenizer's files come along in `tokenizer_files`."""
        return load_model_dir(
            directory, cls.from_checkpoint_files, CHECKPOINT_JSON, dtype, TOKENIZER_FILES
        )

    @classmethod
    def from_checkpoint_files(cls, files: dict[str, Any]) -> PaLM:
        """The model a checkpoint's files describe (CHECKPOINT_JSON parsed, TOKENIZER_FILES as
        text, None where absent), with its adapter scopes, before its weights are loaded."""
        model = cls(PaLMConfig.from_dict(files["config.json"]))
        for scope, raw in (files.get("lora.json") or {}).items():
            model.add_lora(scope, LoRAConfig(**raw), freeze_base=False)
        model.tokenizer_files = {n: files[n] for n in TOKENIZER_FILES if files.get(n) is not None}
        return model
