"""Token log-probs and entropy, temperature-scaled the way the sampler was.

Every stage computes them from the final hidden states through the tied output layer in chunks,
so that no (b, n, v) tensor is ever built (`token_stats_from_hidden`). `logprobs_from_logits`
and `entropy_from_logits` are the plain definitions on full logits: no stage calls them any
more; they stay as the reference the chunked path is tested against, and for callers who do
hold logits.

Shapes: b = batch, n = response length, v = vocabulary, d = model width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at tokens: logits (b, n, v), tokens (b, n) -> (b, n).

    The math runs in float32 whatever the logits' dtype. Divide by the temperature used for
    sampling, on the old, reference and new policy alike (checklist item 3).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = (logits.float() / temperature).log_softmax(dim=-1)  # (b, n, v)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy -sum_v p log p of softmax(logits / temperature): (b, n, v) -> (b, n), float32.

    Logits of -inf (filtered tokens) contribute 0, with finite gradients.
    """
    logp = (logits.float() / temperature).log_softmax(dim=-1)  # (b, n, v)
    # 0 * -inf is nan; replacing -inf before the product keeps the value and the gradient finite.
    safe_logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp.exp() * safe_logp).sum(dim=-1)


CHUNK_ELEMENTS = 2**25
"""Logits per chunk of `token_stats_from_hidden` by default: backward holds a few float32
copies of one chunk (logits, softmax, their gradient), about 0.5 GB at this size."""


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(scale * hidden @ weight^T / temperature), float32, shaped
    like the targets: the target's log-prob, the log normaliser log Z (for z-loss) and, when
    asked for, the entropy (else None)."""

    logprobs: Tensor
    log_z: Tensor
    entropy: Tensor | None


def token_stats_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    scale: float = 1.0,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_size: int | None = None,
) -> TokenStats:
    """What `logprobs_from_logits` and `entropy_from_logits` give, from the final hidden states
    (..., d) and the tied output weight (v, d), without ever holding (..., v) logits: rows go
    through the output layer `chunk_size` at a time, and under autograd each chunk is
    checkpointed, so its (chunk, v) logits are recomputed in backward instead of stored. Peak
    memory grows with chunk_size * v, not with batch * length * v (Cohere's v is 256,000). The
    default chunk holds CHUNK_ELEMENTS logits (128 MB in float32): 131 rows at v = 256,000, the
    whole batch at a toy vocabulary.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).clamp(min=0)  # IGNORE_INDEX reads row 0; callers mask it
    logprobs, log_z, ent = _ChunkedTokenStats.apply(
        flat_hidden, weight, flat_targets, scale / temperature, entropy, chunk_size, shape
    )
    return TokenStats(logprobs, log_z, ent if entropy else None)


class _ChunkedTokenStats(torch.autograd.Function):
    """Forward: per chunk of rows, logits z = factor * hidden @ weight^T in float32, then the
    target's log-prob z_t - log Z, log Z and (optionally) the entropy; only the inputs are kept.
    Backward: each chunk's logits are recomputed and the gradient with respect to them written
    down directly, with p = softmax(z):
        d logprob / dz = onehot(t) - p,   d log Z / dz = p,   d entropy / dz = -p (z - E_p[z])
    then pushed through the output layer to hidden and weight (weight's in float32). Under
    autocast the matrix products run in the autocast dtype in both directions."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, factor, entropy, chunk_size, shape):
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.factor, ctx.entropy, ctx.chunk_size = factor, entropy, chunk_size
        ctx.save_for_backward(hidden, weight, targets)
        rows = hidden.shape[0]
        # Outputs in the targets' shape, written through flat views: returned as tensors of
        # their own, not views (a module that returns a view cannot be hooked safely by FSDP2).
        outputs = [hidden.new_empty(shape, dtype=torch.float32) for _ in range(2)]
        outputs.append(hidden.new_zeros(shape if entropy else (0,), dtype=torch.float32))
        logprobs, log_z, ent = (out.view(-1) for out in outputs)
        for start in range(0, rows, chunk_size):
            end = min(rows, start + chunk_size)
            z = _scaled_logits(hidden[start:end], weight, factor)  # (c, v)
            lse = z.logsumexp(dim=-1)
            log_z[start:end] = lse
            logprobs[start:end] = z.gather(-1, targets[start:end, None]).squeeze(-1) - lse
            if entropy:
                p = (z - lse[:, None]).exp_()
                ent[start:end] = lse - (p * z).sum(dim=-1)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_log_z, grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        flat = [None if g is None else g.reshape(-1) for g in (grad_logprobs, grad_log_z)]
        grad_logprobs, grad_log_z = flat
        if grad_entropy is not None:
            grad_entropy = grad_entropy.reshape(-1)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        enabled, dtype = ctx.autocast
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if want_weight
            else None
        )
        rows = hidden.shape[0]
        matmul_dtype = dtype if enabled else weight.dtype
        with torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            for start in range(0, rows, ctx.chunk_size):
                end = min(rows, start + ctx.chunk_size)
                h = hidden[start:end]
                z = _scaled_logits(h, weight, ctx.factor)  # (c, v), recomputed
                p = z.sub(z.logsumexp(dim=-1, keepdim=True)).exp_()
                coef = torch.zeros(end - start, 1, device=z.device)
                if grad_log_z is not None:
                    coef = coef + grad_log_z[start:end, None]
                if grad_logprobs is not None:
                    coef = coef - grad_logprobs[start:end, None]
                if ctx.entropy and grad_entropy is not None and grad_entropy.numel():
                    # -g p (z - E[z]) + coef p = p * (coef + g E[z] - g z), built in place in z
                    g = grad_entropy[start:end, None]
                    mean_z = (p * z).sum(dim=-1, keepdim=True)
                    grad_z = z.mul_(-g).add_(coef + g * mean_z).mul_(p)
                else:
                    grad_z = p.mul_(coef)
                if grad_logprobs is not None:
                    grad_z.scatter_add_(1, targets[start:end, None], grad_logprobs[start:end, None])
                if ctx.factor != 1.0:
                    grad_z.mul_(ctx.factor)
                # The products in the forward's precision: the autocast dtype, else the
                # weight's (a frozen bf16 base stays bf16; no float32 copy of it is made).
                grad_z = grad_z.to(matmul_dtype)
                if want_hidden:
                    grad_hidden[start:end] = (grad_z @ weight.to(matmul_dtype)).to(hidden.dtype)
                if want_weight:
                    grad_weight += (grad_z.t() @ h.to(matmul_dtype)).float()
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if want_weight else None,
            None,
            None,
            None,
            None,
            None,
        )


def _scaled_logits(hidden: Tensor, weight: Tensor, factor: float) -> Tensor:
    """factor * hidden @ weight^T in float32; no extra pass over the logits when factor is 1."""
    logits = F.linear(hidden, weight).float()
    return logits if factor == 1.0 else logits.mul_(factor)
