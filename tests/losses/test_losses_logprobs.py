"""Chunked token statistics from hidden states equal the full-logits path, in value and in
gradient, and never keep a (rows x vocabulary) tensor for backward."""

import pytest
import torch
from conftest import assert_close_f32

from palm_rlhf.losses.logprobs import (
    entropy_from_logits,
    logprobs_from_logits,
    token_stats_from_hidden,
)

ROWS, WIDTH, VOCAB = 2 * 7, 8, 300  # rows > width: logits outweigh the weight


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, WIDTH, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, generator=generator).mul_(0.5).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (2, 7), generator=generator)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 5, 14, 1024])
@pytest.mark.parametrize(("scale", "temperature"), [(1.0, 1.0), (0.0625, 0.7)])
def test_chunked_stats_equal_the_full_logits_in_value_and_gradient(chunk_size, scale, temperature):
    hidden, weight, targets = inputs()
    logits = scale * hidden @ weight.T  # (2, 7, v): the path the chunks replace
    full_lp = logprobs_from_logits(logits, targets, temperature)
    full_ent = entropy_from_logits(logits, temperature)
    full_z = (logits / temperature).logsumexp(dim=-1)
    full_loss = (full_lp * 0.3 + full_ent * 0.2 + full_z.pow(2) * 0.1).sum()
    full_grads = torch.autograd.grad(full_loss, (hidden, weight))

    stats = token_stats_from_hidden(
        hidden, weight, targets, scale, temperature, entropy=True, chunk_size=chunk_size
    )
    for ours, theirs in (
        (stats.logprobs, full_lp),
        (stats.entropy, full_ent),
        (stats.log_z, full_z),
    ):
        assert ours.shape == theirs.shape and ours.dtype == torch.float32
        assert_close_f32(ours, theirs)
    loss = (stats.logprobs * 0.3 + stats.entropy * 0.2 + stats.log_z.pow(2) * 0.1).sum()
    for ours, theirs in zip(torch.autograd.grad(loss, (hidden, weight)), full_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


def test_no_rows_by_vocabulary_tensor_is_kept_for_backward():
    """What autograd saves is bounded by the chunk, not by rows x vocabulary (the bug this
    replaces: every stage kept (b, n, v) float32 logits and their log-softmax)."""
    hidden, weight, targets = inputs()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        stats = token_stats_from_hidden(hidden, weight, targets, entropy=True, chunk_size=4)
    assert max(saved) < ROWS * VOCAB  # the full path saves ROWS * VOCAB logits
    assert max(saved) <= VOCAB * WIDTH  # the weight itself is the largest thing kept
    (stats.logprobs.sum() + stats.entropy.sum()).backward()
    assert hidden.grad is not None and weight.grad is not None


def test_without_gradients_nothing_is_checkpointed_and_entropy_is_optional():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        stats = token_stats_from_hidden(hidden, weight, targets, chunk_size=3)
    assert stats.entropy is None and not stats.logprobs.requires_grad
    assert_close_f32(
        stats.logprobs, logprobs_from_logits(hidden.detach() @ weight.detach().T, targets)
    )


def test_bad_arguments_are_named():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="temperature"):
        token_stats_from_hidden(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_stats_from_hidden(hidden, weight, targets, chunk_size=0)
