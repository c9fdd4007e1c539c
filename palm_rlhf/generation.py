"""Sampling and batched, left-padded generation with a KV cache.

Prompts of different lengths are left-padded into one batch; each forward gets explicit
positions counted over real tokens (RLHF checklist item 1), so a row's tokens and log-probs do
not depend on how much padding it has. The returned log-probs come from exactly the distribution
each token was sampled from: logits / temperature, then top-k and top-p filtering, renormalised
(checklist item 3); `sampling_logprobs` computes them from logits the same way (the tests check
generate against it; PPO and GRPO recompute old log-probs with a full forward instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from .model.lora import LoRALinear
from .model.palm import PaLM
from .tokenizers.base import pad_sequences


class GenerationOutput(NamedTuple):
    """What `generate` returns. b = batch, n_new = decoding steps run, p = padded prompt length."""

    tokens: Tensor
    """(b, n_new) long: sampled ids; pad_id after a row emitted eos."""
    logprobs: Tensor
    """(b, n_new) float: log-prob of each token under its sampling distribution; 0 where masked."""
    mask: Tensor
    """(b, n_new) bool: True for real response tokens (up to and including eos)."""
    prompt_tokens: Tensor
    """(b, p) long: the prompts, left-padded with pad_id."""
    prompt_mask: Tensor
    """(b, p) bool: True for real prompt tokens."""


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """logits (..., v) -> logits of the sampling distribution: divided by the temperature, with
    everything outside the top-k and outside the top-p nucleus set to -inf."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the tokens ranked above it already cover top_p; the first always stays.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sampling_logprobs(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Log-prob of tokens (...) under the filtered distribution of logits (..., v)."""
    if temperature == 0:  # greedy decoding reports the unscaled, unfiltered model distribution
        logp = logits.float().log_softmax(dim=-1)
    else:
        logp = filter_logits(logits, temperature, top_k, top_p).log_softmax(dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample_next(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """logits (b, v) -> (token (b,), log-prob (b,)). temperature 0 means greedy; its log-prob is
    then reported under the unscaled, unfiltered model distribution."""
    if temperature == 0:
        logp = logits.float().log_softmax(dim=-1)
        token = logp.argmax(dim=-1)
    else:
        logp = filter_logits(logits, temperature, top_k, top_p).log_softmax(dim=-1)
        token = sample_categorical(logp.exp(), generator)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of probs (b, v) by inverting the CDF: the first token whose cumulative
    probability reaches u ~ U(0, total]. Exact sampling like torch.multinomial, at a fraction of
    its cost per decoding step (multinomial draws an exponential for every vocabulary entry).
    Tokens of probability 0 are never drawn."""
    cdf = probs.cumsum(dim=-1)  # (b, v)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    # u in (0, total]: a draw of exactly 0 would land on a leading zero-probability token.
    u = (1.0 - u) * total
    return torch.searchsorted(cdf, u).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


PACK_MAX_VOCAB = 65_536
"""Packing is for small vocabularies. Once MKL packs weights, its buffer cache keeps one
logits-sized buffer per decoding step (measured: 2.2 GB over 64 steps of 32 rows at Cohere's
256,000 tokens, against 0.27 GB unpacked; benchmarks/bench_memory.py), and at such a
vocabulary the output layer, which is never packed, is most of a step's time anyway."""


def can_pack_weights(model: PaLM) -> bool:
    """MKL's packed float32 GEMM applies: float32 weights on the CPU, a vocabulary of at most
    PACK_MAX_VOCAB, and no autocast (which would hand the packed product bf16 inputs; PPO/GRPO
    sample under it with bf16 mixed precision). Not for a model sharded with FSDP2: its
    weights are whole only while gathered, and a packed copy would be one more whole copy."""
    weight = model.token_emb.weight
    return (
        not isinstance(model, FSDPModule)
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and model.config.num_tokens <= PACK_MAX_VOCAB
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


@contextmanager
def packed_weights(model: PaLM, rows: int, lora_scope: str | None = None) -> Iterator[None]:
    """Give every projection an MKL-packed copy of its weight for the duration of a decode.

    On CPU, decoding multiplies a few rows by each weight matrix; MKL's packed GEMM does that
    markedly faster for batches of rows than a plain GEMM (benchmarks/bench_model.py). Products
    agree with F.linear's to float rounding (tested at atol 1e-5 on log-probs). Packing reads
    each weight once (about one decoding step's worth of work) and holds a second copy of the
    weights until the decode ends. With a LoRA scope, the copy is W + (alpha/r) B A, so decoding
    with an adapter (PPO rollouts) costs no more than decoding the base.
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    try:
        for layer in layers:
            weight = layer.weight.detach()
            if lora_scope is not None and lora_scope in layer.adapters:
                weight = weight + layer.adapters[lora_scope].delta_weight().detach()
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
            layer.packed = (packed, rows, weight, lora_scope)
        yield
    finally:
        for layer in layers:
            layer.packed = None


def _prepare_prompts(
    model: PaLM, prompts: Sequence[Sequence[int] | Tensor] | Tensor, pad_id: int | None
) -> tuple[Tensor, Tensor]:
    if isinstance(prompts, Tensor):
        if prompts.ndim == 1:
            prompts = prompts[None]
        if prompts.ndim != 2:
            raise ValueError(f"prompt tensor must be (batch, length), got {tuple(prompts.shape)}")
        rows = [row.tolist() for row in prompts]
    else:
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one prompt")
        rows = [p.tolist() if isinstance(p, Tensor) else list(p) for p in prompts]
    for index, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(
                f"prompt {index} is empty: every prompt needs at least one token (e.g. a bos token)"
            )
        for token in row:
            if not (isinstance(token, int) and 0 <= token < model.config.num_tokens):
                raise ValueError(
                    f"prompt {index} has token id {token!r} outside the vocabulary "
                    f"[0, {model.config.num_tokens})"
                )
    if pad_id is None and len({len(r) for r in rows}) > 1:
        raise ValueError("prompts have different lengths: pass pad_id to left-pad them")
    return pad_sequences(rows, pad_id if pad_id is not None else 0, "left")


def _check_options(
    model: PaLM,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | Sequence[int] | None,
    pad_id: int | None,
) -> None:
    vocab = model.config.num_tokens
    if not model.config.causal:
        raise ValueError("generate needs a causal model (config.causal=True)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    stops = _stop_list(eos_id)
    for name, value in [*(("eos_id", stop) for stop in stops), ("pad_id", pad_id)]:
        if value is not None and not (isinstance(value, int) and 0 <= value < vocab):
            raise ValueError(f"{name}={value!r} is outside the vocabulary [0, {vocab})")
    if pad_id is not None and pad_id in stops:
        raise ValueError(
            "pad_id must differ from eos_id, or masking padding would also mask "
            "the end of every response"
        )
    if stops and pad_id is None:
        raise ValueError("eos_id needs a pad_id to fill the rows that have finished")


def _stop_list(eos_id: int | Sequence[int] | None) -> list[int]:
    """eos_id as a list of stop ids: one id, several (a chat model's end-of-turn tokens and
    its eos), or none."""
    if eos_id is None:
        return []
    if isinstance(eos_id, int):
        return [eos_id]
    if isinstance(eos_id, Sequence) and len(eos_id) > 0:
        return list(eos_id)
    raise ValueError(f"eos_id must be an int, a non-empty sequence of ints or None: {eos_id!r}")


def _decode(
    model: PaLM,
    prompt_tokens: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    sampling: dict,
    stops: Tensor | None,
    fill: int,
    lora_scope: str | None,
    use_cache: bool,
    stop_together: Callable[[bool], bool] | None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The decoding loop: one (b,) token, log-prob and alive-mask per step.

    Ids were validated on the host before the loop, so no forward re-checks them. Whether every
    row has finished is read back every `stop_check_every(device)` steps, not every step: on a
    GPU each read is a device-to-host sync that stalls the queue of kernels. stop_together
    decides from that read (None: no stop ids, decode to max_new_tokens).
    """
    b, p = prompt_tokens.shape
    check_every = stop_check_every(prompt_tokens.device)
    sequence, sequence_mask = prompt_tokens, prompt_mask
    forward = dict(lora_scope=lora_scope, validate_ids=False)
    cache = None
    if use_cache:
        # A prompt sampled k times (GRPO's groups, best-of-k labelling) is prefilled once and
        # its keys, values and last logits copied to its k rows: 1/k of the prefill's work.
        first, copies = distinct_rows(prompt_tokens, prompt_mask)
        cache = model.new_cache(first.shape[0], max_len=p + max_new_tokens)
        logits = model(
            prompt_tokens[first], mask=prompt_mask[first], cache=cache, last_only=True, **forward
        )[:, -1]
        if first.shape[0] < b:
            cache, logits = cache.gather_rows(copies), logits[copies]
    else:
        logits = model(prompt_tokens, mask=prompt_mask, last_only=True, **forward)[:, -1]
    finished = torch.zeros(b, dtype=torch.bool, device=prompt_tokens.device)
    tokens, logprobs, masks = [], [], []
    for step in range(max_new_tokens):
        token, logprob = sample_next(logits, **sampling)
        alive = ~finished
        tokens.append(token.masked_fill(finished, fill))
        logprobs.append(logprob.masked_fill(finished, 0.0))
        masks.append(alive)
        if stops is not None:
            finished = finished | torch.isin(token, stops)
        # (asked at the same steps on every process when given, stop ids or not)
        check = stop_together is not None and (step + 1) % check_every == 0
        if check and stop_together(bool(finished.all())):
            break
        if step == max_new_tokens - 1:
            break
        if cache is not None:
            # Finished rows keep decoding pad tokens; their outputs are masked out.
            logits = model(tokens[-1][:, None], cache=cache, **forward)[:, -1]
        else:
            sequence = torch.cat((sequence, tokens[-1][:, None]), dim=1)
            sequence_mask = F.pad(sequence_mask, (0, 1), value=True)
            logits = model(sequence, mask=sequence_mask, last_only=True, **forward)[:, -1]
    return tokens, logprobs, masks


def distinct_rows(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(first, copies): the index of each distinct (tokens, mask) row's first occurrence, in
    batch order, and for every row the position in `first` of the row it repeats, so that
    rows == rows[first][copies]."""
    b = tokens.shape[0]
    key = torch.cat((tokens, mask.long()), dim=1)
    _, group = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(b, device=tokens.device)
    # the first row of each group, then those firsts in batch order
    firsts = torch.full((int(group.max()) + 1,), b, device=tokens.device, dtype=torch.long)
    firsts = firsts.scatter_reduce(0, group, rows, reduce="amin")
    first, order = firsts.sort()
    return first, order.argsort()[group]  # group's position among the sorted firsts


def stop_check_every(device: torch.device) -> int:
    """Decoding steps between checks that every row has finished: every step on the CPU (the
    check is free there and saves whole forwards), every 16 on an accelerator (each check is a
    sync; at most 15 steps of finished rows are decoded for nothing, and trimmed)."""
    return 1 if device.type == "cpu" else 16


@torch.no_grad()
def generate(
    model: PaLM,
    prompts: Sequence[Sequence[int] | Tensor] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    lora_scope: str | None = None,
    use_cache: bool = True,
    pack_weights: bool | None = None,
    stop_together: Callable[[bool], bool] | None = None,
) -> GenerationOutput:
    """Sample up to max_new_tokens for a batch of prompts of any lengths.

    Rows that emit eos_id (or any of several ids: a chat model ends its turn with its own token)
    are finished: they emit pad_id from then on (mask False) and decoding stops when every row
    is finished. temperature=0 is greedy. `seed` makes sampling
    reproducible (or pass your own `generator`). The model runs in eval mode (dropout off) and
    is returned to its previous mode afterwards. use_cache=False re-runs the whole sequence each
    step: slow, kept as the reference the cached path is tested against. pack_weights (default:
    on for float32 CPU models with MKL) decodes with MKL-packed weight copies; see
    `packed_weights`. stop_together: given whether this batch's rows have all finished, says
    whether to stop; processes decoding a model sharded across them pass one that is True only
    once every process's rows have finished (each step's forward is a collective, so they must
    stop at the same step).
    """
    _check_options(model, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id)
    device = model.token_emb.weight.device
    prompt_tokens, prompt_mask = _prepare_prompts(model, prompts, pad_id)
    prompt_tokens, prompt_mask = prompt_tokens.to(device), prompt_mask.to(device)
    b, p = prompt_tokens.shape
    if p + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"longest prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds max_seq_len {model.config.max_seq_len}"
        )
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    fill = pad_id if pad_id is not None else 0

    if pack_weights is None:
        pack_weights = use_cache and can_pack_weights(model)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    stops = torch.tensor(_stop_list(eos_id), device=device) if eos_id is not None else None
    was_training = model.training
    model.eval()
    try:
        with packed_weights(model, b, lora_scope) if pack_weights else nullcontext():
            tokens, logprobs, masks = _decode(
                model,
                prompt_tokens,
                prompt_mask,
                max_new_tokens,
                sampling,
                stops,
                fill,
                lora_scope,
                use_cache,
                stop_together or (bool if stops is not None else None),
            )
    finally:
        model.train(was_training)
    mask = torch.stack(masks, dim=1)  # (b, steps)
    # Steps decoded after every row had finished (checked only every few steps) hold nothing:
    # cut them, so the output is the same whichever step the stop was noticed at.
    steps = int(mask.any(dim=0).nonzero().max()) + 1 if eos_id is not None else mask.shape[1]
    return GenerationOutput(
        tokens=torch.stack(tokens, dim=1)[:, :steps],
        logprobs=torch.stack(logprobs, dim=1)[:, :steps],
        mask=mask[:, :steps],
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
    )
