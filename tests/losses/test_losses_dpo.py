"""DPO maths against hand-computed numbers: sequence log-probs, the sigmoid, conservative and IPO
pair losses, the K-wise ranking loss, listwise Plackett-Luce with ties, preference metrics."""

import math

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.losses.dpo import (
    dpo_pair_loss,
    implicit_rewards,
    plackett_luce_loss,
    preference_metrics,
    ranking_dpo_loss,
    sequence_logprobs,
)

T, F = True, False


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# --- sequence log-probs and implicit rewards ---------------------------------------------------


def test_sequence_logprobs_sum_valid_tokens_and_ignore_nan_and_inf_at_masked_ones():
    token_logprobs = torch.tensor(
        [[-1.0, -2.0, math.nan], [-0.5, math.inf, -math.inf]], dtype=torch.float64
    ).requires_grad_()
    mask = torch.tensor([[T, T, F], [T, F, F]])
    out = sequence_logprobs(token_logprobs, mask)
    assert out.dtype == torch.float32
    assert_close(out, tensor([-1.0 + -2.0, -0.5]))
    out.sum().backward()
    assert_close(token_logprobs.grad, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).double())


def test_implicit_rewards_are_beta_times_the_log_ratio():
    policy, ref = tensor([-10.0, -15.0]), tensor([-12.0, -14.0])
    assert_close(implicit_rewards(policy, ref, beta=0.1), tensor([0.1 * 2.0, 0.1 * -1.0]))


# --- pair losses -------------------------------------------------------------------------------

# log pi - log pi_ref of two pairs: h = 2 - (-1) = 3 (right way round), h = -0.5 - 0.5 = -1.
CHOSEN, REJECTED = tensor([2.0, -0.5]), tensor([-1.0, 0.5])


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_h():
    # -log sigmoid(0.1 * 3) = log(1 + e^-0.3); -log sigmoid(0.1 * -1) = log(1 + e^0.1)
    expected = tensor([math.log(1 + math.exp(-0.3)), math.log(1 + math.exp(0.1))])
    assert_close(dpo_pair_loss(CHOSEN, REJECTED, beta=0.1), expected)


def test_sigmoid_gradient_is_beta_times_sigmoid_of_the_wrong_way_margin():
    # Rafailov et al. 2023 section 4: d loss / d chosen = -beta * sigmoid(-beta h)
    chosen = CHOSEN.clone().requires_grad_()
    dpo_pair_loss(chosen, REJECTED, beta=0.1).sum().backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    assert_close(chosen.grad, tensor([-0.1 * sigmoid(-0.3), -0.1 * sigmoid(0.1)]))


def test_label_smoothing_mixes_in_the_flipped_label():
    # 0.9 * -log sigmoid(0.3) + 0.1 * -log sigmoid(-0.3), and likewise for beta h = -0.1
    expected = tensor(
        [
            0.9 * math.log(1 + math.exp(-0.3)) + 0.1 * math.log(1 + math.exp(0.3)),
            0.9 * math.log(1 + math.exp(0.1)) + 0.1 * math.log(1 + math.exp(-0.1)),
        ]
    )
    assert_close(dpo_pair_loss(CHOSEN, REJECTED, 0.1, label_smoothing=0.1), expected)
    # at h = 0 both labels cost log 2 whatever eps is
    zero = tensor([0.0])
    assert_close(dpo_pair_loss(zero, zero, 0.1, label_smoothing=0.3), tensor([math.log(2)]))


def test_ipo_loss_regresses_h_onto_one_over_two_beta():
    # 1 / (2 * 0.1) = 5: (3 - 5)^2 = 4, (-1 - 5)^2 = 36
    assert_close(dpo_pair_loss(CHOSEN, REJECTED, 0.1, loss_type="ipo"), tensor([4.0, 36.0]))


def test_ipo_gradient_vanishes_at_the_target_and_is_2_h_minus_target_elsewhere():
    chosen = tensor([5.0, 3.0]).requires_grad_()
    dpo_pair_loss(chosen, tensor([0.0, 0.0]), 0.1, loss_type="ipo").sum().backward()
    assert_close(chosen.grad, tensor([0.0, 2 * (3.0 - 5.0)]))


# --- K-wise ranking loss -----------------------------------------------------------------------

# A ragged batch with the prompts interleaved: prompt 7 has K=3 and no ties, prompt 3 K=3 with a
# tie between its last two, prompt 9 two completions tied (ignored, even in the divisor).
RAGGED_LOGRATIOS = tensor([1.0, 0.5, 4.0, 0.0, 1.5, -2.0, -1.0, -4.0])
RAGGED_RANKS = ints([0, 2, 3, 1, 5, 2, 5, 3])
RAGGED_GROUP = ints([7, 3, 9, 7, 3, 7, 3, 9])


def test_ranking_dpo_loss_on_a_ragged_batch_against_the_explicit_sum():
    beta = 0.5
    loss = lambda h: math.log(1 + math.exp(-beta * h))  # -log sigmoid(beta h)
    # prompt 7: 1.0 > 0.0 > -2.0, three pairs over C(3, 2) = 3
    prompt_7 = (loss(1.0 - 0.0) + loss(1.0 - -2.0) + loss(0.0 - -2.0)) / 3
    # prompt 3: 0.5 > {1.5, -1.0}, two untied pairs, still over C(3, 2) = 3
    prompt_3 = (loss(0.5 - 1.5) + loss(0.5 - -1.0)) / 3
    expected = (prompt_7 + prompt_3) / 2
    out = ranking_dpo_loss(RAGGED_LOGRATIOS, RAGGED_RANKS, RAGGED_GROUP, beta)
    assert_close(out, scalar(expected))


def test_ranking_dpo_loss_with_ipo_on_the_ragged_batch():
    beta = 0.5
    loss = lambda h: (h - 1 / (2 * beta)) ** 2  # target 1
    prompt_7 = (loss(1.0 - 0.0) + loss(1.0 - -2.0) + loss(0.0 - -2.0)) / 3
    prompt_3 = (loss(0.5 - 1.5) + loss(0.5 - -1.0)) / 3
    out = ranking_dpo_loss(RAGGED_LOGRATIOS, RAGGED_RANKS, RAGGED_GROUP, beta, loss_type="ipo")
    assert_close(out, scalar((prompt_7 + prompt_3) / 2))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_ranking_dpo_loss_with_two_completions_per_prompt_is_the_mean_pair_loss(loss_type, eps):
    torch.manual_seed(0)
    chosen, rejected = torch.randn(4), torch.randn(4)
    # the loser comes first in prompts 1 and 3 of the flat batch
    logratios = torch.stack([chosen[0], rejected[0], rejected[1], chosen[1]])
    logratios = torch.cat([logratios, torch.stack([chosen[2], rejected[2]])])
    logratios = torch.cat([logratios, torch.stack([rejected[3], chosen[3]])])
    ranks = ints([0, 1, 1, 0, 0, 1, 4, 2])
    group = ints([0, 0, 1, 1, 2, 2, 3, 3])
    out = ranking_dpo_loss(logratios, ranks, group, 0.3, loss_type, eps)
    assert_close(out, dpo_pair_loss(chosen, rejected, 0.3, loss_type, eps).mean())


def test_ranking_dpo_loss_without_an_untied_pair_is_a_zero_in_the_graph():
    logratios = tensor([1.0, 2.0, 3.0]).requires_grad_()
    out = ranking_dpo_loss(logratios, ints([0, 0, 1]), ints([0, 0, 1]), 0.1)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert_close(logratios.grad, torch.zeros(3))


# --- Plackett-Luce -----------------------------------------------------------------------------


def pl_loss(logratios, ranks, beta=0.5, group=None):
    group = ints([0] * len(ranks)) if group is None else group
    return plackett_luce_loss(tensor(logratios), ints(ranks), group, beta)


def test_plackett_luce_with_two_completions_is_the_sigmoid_dpo_loss():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(3), torch.randn(3)
    flat = [chosen[0], rejected[0], rejected[1], chosen[1], chosen[2], rejected[2]]
    logratios = torch.stack(flat)
    ranks, group = ints([0, 1, 1, 0, 2, 5]), ints([0, 0, 1, 1, 2, 2])
    out = plackett_luce_loss(logratios, ranks, group, 0.3)
    assert_close(out, dpo_pair_loss(chosen, rejected, 0.3).mean())


def test_plackett_luce_three_completions_without_ties():
    # beta 0.5: best a = 0.5 * 2.0, then b = 0.5 * 0.4, worst c = 0.5 * -1.0
    a, b, c = 1.0, 0.2, -0.5
    expected = -(
        math.log(math.exp(a) / (math.exp(a) + math.exp(b) + math.exp(c)))
        + math.log(math.exp(b) / (math.exp(b) + math.exp(c)))
    )
    # flat order: b, c, a
    assert_close(pl_loss([0.4, -1.0, 2.0], [1, 2, 0]), scalar(expected))


def test_plackett_luce_tie_at_the_bottom_gives_one_term_over_all_three():
    a, b, c = 1.0, 0.2, -0.5  # {a} > {b, c}
    expected = -math.log(math.exp(a) / (math.exp(a) + math.exp(b) + math.exp(c)))
    assert_close(pl_loss([2.0, 0.4, -1.0], [0, 1, 1]), scalar(expected))


def test_plackett_luce_tie_at_the_top_keeps_the_tied_pair_out_of_each_others_terms():
    a, b, c = 1.0, 0.2, -0.5  # {a, b} > {c}
    expected = -(
        math.log(math.exp(a) / (math.exp(a) + math.exp(c)))
        + math.log(math.exp(b) / (math.exp(b) + math.exp(c)))
    )
    assert_close(pl_loss([2.0, 0.4, -1.0], [3, 3, 8]), scalar(expected))


def test_plackett_luce_three_tiers_with_a_tie_in_the_middle():
    a, b, c, d = 1.0, 0.2, -0.5, 0.3  # {a} > {b, c} > {d}
    e = math.exp
    expected = -(
        math.log(e(a) / (e(a) + e(b) + e(c) + e(d)))
        + math.log(e(b) / (e(b) + e(d)))
        + math.log(e(c) / (e(c) + e(d)))
    )
    assert_close(pl_loss([2.0, 0.4, -1.0, 0.6], [0, 1, 1, 2]), scalar(expected))


def test_plackett_luce_averages_over_prompts_with_two_tiers_and_ignores_all_tied_ones():
    a, b, c = 1.0, 0.2, -0.5
    no_ties = -(math.log(math.exp(a) / (math.exp(a) + math.exp(b) + math.exp(c)))) - math.log(
        math.exp(b) / (math.exp(b) + math.exp(c))
    )
    tie_below = -math.log(math.exp(a) / (math.exp(a) + math.exp(b) + math.exp(c)))
    logratios = tensor([2.0, 0.4, -1.0, 2.0, 0.4, -1.0, 5.0, -5.0]).requires_grad_()
    ranks, group = ints([0, 1, 2, 0, 1, 1, 0, 0]), ints([0, 0, 0, 1, 1, 1, 2, 2])
    out = plackett_luce_loss(logratios, ranks, group, 0.5)
    assert_close(out, scalar((no_ties + tie_below) / 2))
    out.backward()
    assert torch.isfinite(logratios.grad).all()
    assert_close(logratios.grad[6:], torch.zeros(2))  # the all-tied prompt gets no gradient


def test_plackett_luce_ignores_the_order_of_the_flat_batch():
    torch.manual_seed(0)
    logratios = torch.randn(9)
    ranks, group = ints([0, 1, 1, 2, 0, 0, 1, 3, 3]), ints([0, 0, 0, 0, 1, 1, 1, 2, 2])
    perm = torch.randperm(9)
    assert_close(
        plackett_luce_loss(logratios[perm], ranks[perm], group[perm], 0.2),
        plackett_luce_loss(logratios, ranks, group, 0.2),
    )


def test_plackett_luce_is_finite_for_huge_log_ratios_and_zero_without_two_tiers():
    logratios = tensor([1e4, -1e4, 0.0]).requires_grad_()
    out = plackett_luce_loss(logratios, ints([2, 0, 1]), ints([0, 0, 0]), 1.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(logratios.grad).all()
    tied = tensor([1.0, 2.0]).requires_grad_()
    zero = plackett_luce_loss(tied, ints([1, 1]), ints([0, 0]), 1.0)
    assert zero.item() == 0.0 and zero.requires_grad


# --- metrics -----------------------------------------------------------------------------------


def test_preference_metrics_on_a_hand_made_batch():
    beta = 0.5
    # prompt 0: ranks 0 < 1 < 2, rewards 0.5, 0.0, 1.0; prompt 1: 0.25 > -0.25;
    # prompt 2: tied (ignored); prompt 3: untied but equal rewards 0.35, 0.35 (not "correct").
    logratios = tensor([1.0, 0.0, 2.0, 0.5, -0.5, 3.0, 3.0, 0.7, 0.7]).requires_grad_()
    ranks = ints([0, 1, 2, 0, 1, 0, 0, 0, 1])
    group = ints([0, 0, 0, 1, 1, 2, 2, 3, 3])
    stats = preference_metrics(logratios, ranks, group, beta)
    # pairs (w, l): (0.5, 0.0) (0.5, 1.0) (0.0, 1.0) (0.25, -0.25) (0.35, 0.35)
    expected = {
        "reward_accuracy": 2 / 5,
        "reward_margin": (0.5 - 0.5 - 1.0 + 0.5 + 0.0) / 5,
        "chosen_reward": (0.5 + 0.5 + 0.0 + 0.25 + 0.35) / 5,
        "rejected_reward": (0.0 + 1.0 + 1.0 - 0.25 + 0.35) / 5,
        "num_pairs": 5.0,
    }
    assert set(stats) == set(expected)
    for name, value in expected.items():
        assert_close(stats[name], scalar(value), msg=name)
        assert not stats[name].requires_grad


def test_preference_metrics_without_pairs_are_zeros():
    for logratios, ranks in [(tensor([]), ints([])), (tensor([1.0, 2.0]), ints([0, 0]))]:
        stats = preference_metrics(logratios, ranks, torch.zeros_like(ranks), 0.1)
        for name, value in stats.items():
            assert value.item() == 0.0, name


# --- argument checks ---------------------------------------------------------------------------

LR, RK, GR = tensor([1.0, 0.0]), ints([0, 1]), ints([0, 0])


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: dpo_pair_loss(LR, LR, beta=0.0), "beta"),
        (lambda: dpo_pair_loss(LR, LR, beta=-1.0), "beta"),
        (lambda: dpo_pair_loss(LR, LR, beta=math.nan), "beta"),
        (lambda: dpo_pair_loss(LR, LR, 0.1, label_smoothing=0.5), "label_smoothing"),
        (lambda: dpo_pair_loss(LR, LR, 0.1, label_smoothing=-0.1), "label_smoothing"),
        (lambda: dpo_pair_loss(LR, LR, 0.1, loss_type="hinge"), "loss_type"),
        (lambda: dpo_pair_loss(LR, LR, 0.1, "ipo", label_smoothing=0.1), "label_smoothing"),
        (lambda: dpo_pair_loss(LR, LR[:1], 0.1), "chosen_logratio"),
        (lambda: ranking_dpo_loss(LR[:1], RK, GR, 0.1), "logratios"),
        (lambda: ranking_dpo_loss(LR, RK, GR, 0.1, loss_type="kto"), "loss_type"),
        (lambda: ranking_dpo_loss(LR, RK.float(), GR, 0.1), "ranks"),
        (lambda: plackett_luce_loss(LR, RK, GR, 0.0), "beta"),
        (lambda: plackett_luce_loss(LR, RK, GR[:1], 0.1), "ranks"),
        (lambda: preference_metrics(LR, RK, GR, -0.1), "beta"),
        (lambda: sequence_logprobs(LR[None], torch.ones(1, 3, dtype=torch.bool)), "mask"),
        (lambda: implicit_rewards(LR, LR, 0.0), "beta"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
