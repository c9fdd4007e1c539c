"""Masked statistics, the one implementation every loss and advantage uses: the mean, the
variance and whitening over the positions a mask keeps.

One mask convention throughout: `mask` bool, True = keep (a real response token). Everything at
mask == False is ignored by every statistic and comes out as exactly 0 (RLHF checklist item 7),
so padding after a response's end can hold any value, even inf or nan, without leaking into
the results.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over mask == True entries (all of them, or along dim); mask broadcasts to x.

    An empty selection gives 0 rather than nan.
    """
    mask = mask.bool()
    total = x.masked_fill(~mask, 0)
    count = mask.expand_as(total).to(total.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1)
    return total.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all mask == True entries (a scalar).

    unbiased applies Bessel's correction n / (n - 1); with a single valid entry it is skipped
    (the variance is then 0).
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.expand_as(x).sum()
        var = var * torch.where(count > 1, count / (count - 1).clamp(min=1), 1.0)
    return var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var over valid entries only (checklist
    item 13); shift_mean=False adds the mean back (whitens the scale only). 0 where masked.

    stats=(mean, var) supplies the statistics from outside: REINFORCE++ whitens each process's
    returns with the mean and variance of the whole batch across processes (Hu et al. 2025)."""
    mask = mask.bool()
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~mask, 0)
