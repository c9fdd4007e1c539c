"""Hand-computed checks of the critic-free maths (palm_rlhf.losses.grpo)."""

import math

import pytest
import torch
from torch import tensor
from torch.testing import assert_close

from palm_rlhf.losses.grpo import (
    aggregate_loss,
    clipped_surrogate,
    discounted_returns,
    group_advantages,
    informative_groups,
    k3_kl,
    leave_one_out_advantages,
    overlong_penalty,
    sequence_log_ratio,
)
from palm_rlhf.losses.masked import masked_whiten

# Two groups of three: rewards (1, 2, 3) and (5, 5, 5).
SCORES = tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
GROUP = tensor([0, 0, 0, 1, 1, 1])


def test_group_advantages_for_each_scale():
    # Group 0: mean 2, unbiased std sqrt(((1)^2 + 0 + 1^2) / 2) = 1. Group 1: all equal -> 0.
    eps = 1e-4
    expected_group = tensor([-1 / (1 + eps), 0.0, 1 / (1 + eps), 0.0, 0.0, 0.0])
    assert_close(group_advantages(SCORES, GROUP, "group", eps), expected_group)
    # Batch std of (1, 2, 3, 5, 5, 5): mean 3.5, squares 6.25+2.25+0.25+3*2.25 = 15.5, /5 = 3.1.
    batch_std = math.sqrt(3.1)
    expected_batch = tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (batch_std + eps)
    assert_close(group_advantages(SCORES, GROUP, "batch", eps), expected_batch)
    # Dr. GRPO: centred only.
    assert_close(group_advantages(SCORES, GROUP, "none"), tensor([-1.0, 0.0, 1.0, 0, 0, 0]))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(SCORES, GROUP, "global")


def test_group_advantages_do_not_depend_on_row_order():
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    assert_close(group_advantages(SCORES[perm], GROUP[perm]), group_advantages(SCORES, GROUP)[perm])


def test_leave_one_out_baseline():
    # Response 0 of group 0: 1 - mean(2, 3) = -1.5; response 1: 2 - 2 = 0; response 2: 3 - 1.5.
    expected = tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    assert_close(leave_one_out_advantages(SCORES, GROUP), expected)
    # Ragged groups: (4, 0) -> 4 - 0 = 4 and 0 - 4 = -4.
    assert_close(leave_one_out_advantages(tensor([4.0, 0.0]), tensor([7, 7])), tensor([4.0, -4.0]))
    with pytest.raises(ValueError, match="at least 2 responses"):
        leave_one_out_advantages(tensor([1.0, 2.0, 3.0]), tensor([0, 0, 1]))


def test_discounted_returns_put_the_score_at_the_last_real_token():
    kl = tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = tensor([[True, True, True], [True, False, False]])
    scores = tensor([1.0, 2.0])
    returns = discounted_returns(scores, kl, mask, kl_coef=0.5, gamma=1.0)
    # Row 0 rewards: -0.05, -0.1, -0.15 + 1; returns to go: 0.7, 0.75, 0.85.
    # Row 1: one token, -0.25 + 2 = 1.75; padding stays 0 whatever its kl.
    assert_close(returns, tensor([[0.7, 0.75, 0.85], [1.75, 0.0, 0.0]]))
    # gamma 0.5: G_2 = 0.85, G_1 = -0.1 + 0.425 = 0.325, G_0 = -0.05 + 0.1625 = 0.1125.
    half = discounted_returns(scores, kl, mask, kl_coef=0.5, gamma=0.5)
    assert_close(half[0], tensor([0.1125, 0.325, 0.85]))


def test_whitening_with_given_statistics():
    """REINFORCE++'s global whitening: the batch's statistics, not this tensor's own."""
    x = tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = tensor([[True, True], [True, False]])
    out = masked_whiten(x, mask, eps=0.0, stats=(tensor(3.0), tensor(4.0)))
    assert_close(out, tensor([[-1.0, 0.0], [1.0, 0.0]]))
    # Its own statistics (mean 3, unbiased var 4) give the same here.
    assert_close(masked_whiten(x, mask, eps=0.0), out)


def test_overlong_penalty_ramps_over_the_buffer():
    # L_max 10, buffer 4: free up to 6, then -(L - 6) / 4 * 2, and -2 at 10.
    lengths = tensor([3, 6, 7, 8, 10])
    assert_close(overlong_penalty(lengths, 10, 4, 2.0), tensor([0.0, 0.0, -0.5, -1.0, -2.0]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 10, 11, 1.0)


def test_informative_groups_drop_all_equal_groups():
    scores = tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.3])
    group = tensor([2, 2, 5, 5, 9, 9])
    assert informative_groups(scores, group).tolist() == [False, True, False]


def test_k3_kl_value_and_gradient():
    logp = tensor([[math.log(0.5), math.log(0.2)]], requires_grad=True)
    ref = tensor([[math.log(0.25), math.log(0.4)]])
    mask = tensor([[True, True]])
    kl = k3_kl(logp, ref, mask)
    # ref - logp = log 0.5 and log 2: 0.5 - log 0.5 - 1 and 2 - log 2 - 1.
    expected = tensor([[0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1]])
    assert_close(kl, expected)
    kl.sum().backward()
    # d/dlogp = 1 - exp(ref - logp) = 0.5 and -1.
    assert_close(logp.grad, tensor([[0.5, -1.0]]))
    assert (kl >= 0).all()
    assert k3_kl(logp, logp.detach(), mask).abs().max() == 0
    assert k3_kl(logp, ref, tensor([[False, True]]))[0, 0] == 0


def test_asymmetric_clipping_and_its_fractions():
    # Ratios 0.5, 0.9, 1.25, 1.5 against clip_low 0.2, clip_high 0.3.
    ratios = tensor([[0.5, 0.9, 1.25, 1.5]])
    log_ratio = ratios.log().requires_grad_(True)
    advantages = tensor([[-1.0, -1.0, 2.0, 2.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, stats = clipped_surrogate(log_ratio, advantages, mask, 0.2, 0.3)
    # -min(rA, clip(r)A): token 0 min(-0.5, -0.8) = -0.8 (clipped, no gradient);
    # token 1 min(-0.9, -0.9); token 2 min(2.5, 2.5); token 3 min(3.0, 2.6) = 2.6 (clipped).
    assert_close(loss, tensor([[0.8, 0.9, -2.5, -2.6]]))
    assert stats["clip_frac_low"].item() == pytest.approx(0.25)
    assert stats["clip_frac_high"].item() == pytest.approx(0.25)
    loss.sum().backward()
    # d(-rA)/dlog r = -rA on the unclipped tokens, 0 on the clipped ones.
    assert_close(log_ratio.grad, tensor([[0.0, 0.9, -2.5, 0.0]]))
    # The same ratio 1.25 is clipped by a symmetric 0.2 but not by clip-higher 0.3.
    _, symmetric = clipped_surrogate(log_ratio, advantages, mask, 0.2, 0.2)
    assert symmetric["clip_frac_high"].item() == pytest.approx(0.5)
    # Sequence advantages broadcast over tokens.
    broadcast, _ = clipped_surrogate(log_ratio.detach(), tensor([2.0]), mask, 0.2, 0.3)
    assert_close(broadcast[0, 2], tensor(-2.5))


def test_sequence_log_ratio_is_the_mean_over_real_tokens():
    logp = tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 5.0]])
    old = tensor([[-1.5, -2.5, -2.0], [-2.0, -1.0, 0.0]])
    mask = tensor([[True, True, True], [True, True, False]])
    # Row 0: (0.5 + 0.5 - 1) / 3 = 0; row 1: (1 + 0) / 2 = 0.5 (the masked 5 is ignored).
    assert_close(sequence_log_ratio(logp, old, mask), tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))


# A ragged batch: row 0 has 3 tokens with loss 1 each; row 1 has 1 token with loss 4.
PER_TOKEN = tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 99.0, 99.0, 99.0]])
RAGGED = tensor([[True, True, True, False], [True, False, False, False]])


def test_the_three_aggregations_on_a_ragged_batch():
    # grpo: sequence means 1 and 4, then (1 + 4) / 2.
    assert aggregate_loss(PER_TOKEN, RAGGED, "grpo").item() == pytest.approx(2.5)
    assert aggregate_loss(PER_TOKEN, RAGGED, "gspo").item() == pytest.approx(2.5)
    # dapo: (3 + 4) / 4 tokens; with the step's 10 tokens across processes, 7 / 10.
    assert aggregate_loss(PER_TOKEN, RAGGED, "dapo").item() == pytest.approx(7 / 4)
    assert aggregate_loss(PER_TOKEN, RAGGED, "dapo", num_tokens=10).item() == pytest.approx(0.7)
    # dr_grpo: 7 / (2 rows * 8 tokens), the same whatever the lengths.
    assert aggregate_loss(PER_TOKEN, RAGGED, "dr_grpo", max_new_tokens=8).item() == pytest.approx(
        7 / 16
    )
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregate_loss(PER_TOKEN, RAGGED, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(PER_TOKEN, RAGGED, "token_mean")


def test_a_response_without_loss_tokens_is_not_counted_by_the_sequence_mean():
    # Row 2 was masked out (say, truncated with mask_truncated): grpo averages rows 0 and 1.
    per_token = torch.cat((PER_TOKEN, tensor([[7.0, 7.0, 7.0, 7.0]])))
    mask = torch.cat((RAGGED, torch.zeros(1, 4, dtype=torch.bool)))
    assert aggregate_loss(per_token, mask, "grpo").item() == pytest.approx(2.5)
    assert aggregate_loss(per_token, mask, "dapo").item() == pytest.approx(7 / 4)
    assert aggregate_loss(per_token, torch.zeros_like(mask), "grpo").item() == 0.0
