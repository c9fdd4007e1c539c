"""RL maths against hand-computed numbers: KL-shaped rewards, GAE, masked statistics, PPO
losses, the entropy bonus's sign, KL controllers, log-probs and entropy."""

import math

import pytest
import torch
from torch.testing import assert_close

from palm_rlhf.generation import sampling_logprobs
from palm_rlhf.losses.logprobs import entropy_from_logits, logprobs_from_logits
from palm_rlhf.losses.masked import masked_mean, masked_var, masked_whiten
from palm_rlhf.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus_loss,
    gae_advantages,
    kl_penalty_rewards,
    ppo_policy_loss,
    ppo_value_loss,
)

T, F = True, False


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- KL-penalised rewards ----------------------------------------------------------------------


def test_kl_rewards_put_score_at_last_real_token_of_each_row():
    logprobs = tensor([[-1.0, -2.0, -0.5, -0.3], [-0.2, -1.0, 0.0, 0.0]])
    ref_logprobs = tensor([[-1.5, -1.0, -0.5, -9.0], [-0.4, -0.5, 5.0, 5.0]])
    mask = torch.tensor([[T, T, T, F], [T, T, F, F]])
    scores = tensor([2.0, -1.0])
    rewards, kl = kl_penalty_rewards(logprobs, ref_logprobs, mask, scores, kl_coef=0.1)
    # kl row 0: -1 - -1.5 = 0.5, -2 - -1 = -1, 0; row 1: 0.2, -0.5. Masked: 0.
    assert_close(kl, tensor([[0.5, -1.0, 0.0, 0.0], [0.2, -0.5, 0.0, 0.0]]))
    # rewards = -0.1 * kl; score 2 at index 2 (row 0), score -1 at index 1 (row 1): 0.05 - 1.
    assert_close(rewards, tensor([[-0.05, 0.1, 2.0, 0.0], [-0.02, -0.95, 0.0, 0.0]]))


def test_kl_rewards_empty_row_gets_nothing():
    logprobs = tensor([[-1.0, -2.0], [-3.0, -4.0]])
    mask = torch.tensor([[F, F], [T, F]])
    rewards, kl = kl_penalty_rewards(logprobs, torch.zeros(2, 2), mask, tensor([5.0, 1.0]), 0.5)
    assert_close(rewards, tensor([[0.0, 0.0], [1.5 + 1.0, 0.0]]))
    assert_close(kl, tensor([[0.0, 0.0], [-3.0, 0.0]]))


# --- GAE ---------------------------------------------------------------------------------------


def test_gae_gamma_1_lambda_095_by_hand():
    values, rewards = tensor([[0.5, 1.0, 2.0]]), tensor([[0.0, 0.0, 1.0]])
    # t=2: delta = 1 + 1*0 - 2 = -1                       A2 = -1
    # t=1: delta = 0 + 1*2 - 1 = 1                        A1 = 1 + 0.95 * -1 = 0.05
    # t=0: delta = 0 + 1*1 - 0.5 = 0.5                    A0 = 0.5 + 0.95 * 0.05 = 0.5475
    adv, ret = gae_advantages(values, rewards, torch.ones(1, 3, dtype=torch.bool), 1.0, 0.95)
    assert_close(adv, tensor([[0.5475, 0.05, -1.0]]))
    assert_close(ret, tensor([[1.0475, 1.05, 1.0]]))


def test_gae_gamma_09_lambda_1_is_discounted_return():
    values, rewards = tensor([[1.0, 2.0, 3.0]]), tensor([[1.0, -1.0, 2.0]])
    # t=2: delta = 2 - 3 = -1                             A2 = -1
    # t=1: delta = -1 + 0.9*3 - 2 = -0.3                  A1 = -0.3 + 0.9 * -1 = -1.2
    # t=0: delta = 1 + 0.9*2 - 1 = 1.8                    A0 = 1.8 + 0.9 * -1.2 = 0.72
    # returns are the discounted sums: 2, -1 + 0.9*2 = 0.8, 1 + 0.9*0.8 = 1.72
    adv, ret = gae_advantages(values, rewards, torch.ones(1, 3, dtype=torch.bool), 0.9, 1.0)
    assert_close(adv, tensor([[0.72, -1.2, -1.0]]))
    assert_close(ret, tensor([[1.72, 0.8, 2.0]]))


def test_gae_rows_of_different_lengths_ignore_padding():
    # Padding holds garbage (7, 9, inf) that must not leak into real tokens.
    values = tensor([[0.5, 1.0, 2.0, 7.0], [1.0, 3.0, 9.0, float("inf")], [4.0, 4.0, 4.0, 4.0]])
    rewards = tensor([[0.0, 0.0, 1.0, 3.0], [0.5, 2.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[T, T, T, F], [T, T, F, F], [F, F, F, F]])
    adv, ret = gae_advantages(values, rewards, mask, gamma=1.0, lam=0.95)
    # Row 0 is the 3-token example above. Row 1: t=1: delta = 2 - 3 = -1, A1 = -1;
    # t=0: delta = 0.5 + 3 - 1 = 2.5, A0 = 2.5 + 0.95 * -1 = 1.55. Row 2 is empty.
    assert_close(adv, tensor([[0.5475, 0.05, -1.0, 0.0], [1.55, -1.0, 0.0, 0.0], [0.0] * 4]))
    assert_close(ret, tensor([[1.0475, 1.05, 1.0, 0.0], [2.55, 2.0, 0.0, 0.0], [0.0] * 4]))
    assert_close(ret, (adv + values.nan_to_num(posinf=0.0)) * mask)  # returns = adv + values
    assert not adv.requires_grad


def test_gae_padded_batch_equals_each_row_alone():
    values, rewards = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 2, 4]
    mask = torch.arange(6) < torch.tensor(lengths)[:, None]  # (b, n)
    adv, ret = gae_advantages(values, rewards, mask, gamma=0.99, lam=0.9)
    for row, length in enumerate(lengths):
        alone = torch.ones(1, length, dtype=torch.bool)
        row_adv, row_ret = gae_advantages(
            values[row : row + 1, :length], rewards[row : row + 1, :length], alone, 0.99, 0.9
        )
        assert_close(adv[row, :length], row_adv[0], atol=0, rtol=0)
        assert_close(ret[row, :length], row_ret[0], atol=0, rtol=0)


def test_gae_rejects_holes_in_mask():
    with pytest.raises(ValueError, match="contiguous"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[T, F, T]]))


# --- masked statistics -------------------------------------------------------------------------

X = tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -50.0]])
MASK = torch.tensor([[T, T, T, F], [T, T, T, F]])


def test_masked_mean_and_var_by_hand():
    # Valid entries 1..6: mean 3.5, squared deviations sum to 17.5.
    assert_close(masked_mean(X, MASK), torch.tensor(3.5))
    assert_close(masked_mean(X, MASK, dim=1), tensor([2.0, 5.0]))
    assert_close(masked_var(X, MASK), torch.tensor(17.5 / 5))
    assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(17.5 / 6))
    assert_close(masked_mean(X, torch.zeros_like(MASK)), torch.tensor(0.0))


def test_masked_whiten_over_valid_entries_only():
    white = masked_whiten(X, MASK)
    assert_close(white[0, 0], torch.tensor((1 - 3.5) / math.sqrt(3.5)))
    assert_close(masked_mean(white, MASK), torch.tensor(0.0))
    assert_close(masked_var(white, MASK), torch.tensor(1.0))
    assert (white[~MASK] == 0).all()
    changed = X.clone()
    changed[~MASK] = tensor([1e6, float("nan")])
    assert_close(masked_whiten(changed, MASK), white)
    unshifted = masked_whiten(X, MASK, shift_mean=False)
    assert_close(masked_mean(unshifted, MASK), torch.tensor(3.5))
    assert (unshifted[~MASK] == 0).all()


# --- PPO losses --------------------------------------------------------------------------------


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    old = tensor([[-1.0, -2.0, -0.5, -3.0]])
    advantages = tensor([[1.0, -2.0, 3.0, 99.0]])
    mask = torch.tensor([[T, T, T, F]])
    loss, stats = ppo_policy_loss(old.clone(), old, advantages, mask)
    assert_close(loss, torch.tensor(-(1.0 - 2.0 + 3.0) / 3))
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == 0 and stats["ratio_mean"] == 1


def test_policy_loss_clips_the_optimistic_side_only():
    old = tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    ratios = [1.5, 0.5, 1.5, 0.5, 3.0]
    logprobs = (old + tensor([[math.log(r) for r in ratios]])).requires_grad_()
    advantages = tensor([[2.0, -1.0, -1.0, 2.0, 50.0]])
    mask = torch.tensor([[T, T, T, T, F]])
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # min(rA, clip(r)A): 1.5*2=3 vs 1.2*2=2.4 -> 2.4 (clipped); 0.5*-1=-0.5 vs 0.8*-1=-0.8 ->
    # -0.8 (clipped); 1.5*-1=-1.5 vs -1.2 -> -1.5; 0.5*2=1 vs 0.8*2=1.6 -> 1. Loss = -mean.
    assert_close(loss, torch.tensor(-(2.4 - 0.8 - 1.5 + 1.0) / 4))
    assert_close(stats["clip_frac"], torch.tensor(0.5))
    assert_close(stats["ratio_mean"], torch.tensor(1.0))
    k3 = [(r - 1) - math.log(r) for r in ratios[:4]]  # 0.0945, 0.1931, 0.0945, 0.1931
    assert_close(stats["approx_kl"], torch.tensor(sum(k3) / 4))
    loss.backward()
    # Clipped tokens have no gradient; unclipped ones get d(-rA/4)/dlogp = -rA/4; masked none.
    assert_close(logprobs.grad, tensor([[0.0, 0.0, 1.5 / 4, -1.0 / 4, 0.0]]))


def test_value_loss_by_hand_with_and_without_clipping():
    values = tensor([[1.0, 1.5, 1.5, 0.0, 8.0]])
    old_values = tensor([[0.9, 1.0, 1.0, 1.0, 0.0]])
    returns = tensor([[2.0, 2.0, 1.0, 3.0, 0.0]])
    mask = torch.tensor([[T, T, T, T, F]])
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip=0.2)
    # clip(V): 1.0, 1.2, 1.2, 0.8. (V-R)^2: 1, 0.25, 0.25, 9. (clipV-R)^2: 1, 0.64, 0.04, 4.84.
    # max: 1, 0.64 (clipped term wins), 0.25, 9 -> 0.5 * 10.89 / 4.
    assert_close(loss, torch.tensor(0.5 * 10.89 / 4))
    assert_close(stats["value_clip_frac"], torch.tensor(0.25))
    assert_close(stats["value_error"], torch.tensor((1 + 0.25 + 0.25 + 9) / 4))
    # Inside the trust region the loss is plain 0.5 * MSE: 0.5 * (1 + 0.25 + 0.25 + 9) / 4.
    loss, stats = ppo_value_loss(values, values, returns, mask, clip=0.2)
    assert_close(loss, torch.tensor(0.5 * 10.5 / 4))
    assert stats["value_clip_frac"] == 0


def test_entropy_bonus_lowers_loss_as_entropy_rises():
    entropy = tensor([[1.0, 2.0, 3.0, 40.0]]).requires_grad_()
    mask = torch.tensor([[T, T, T, F]])
    loss = entropy_bonus_loss(entropy, mask, coef=0.01)
    assert_close(loss, torch.tensor(-0.01 * 2.0))
    loss.backward()
    assert (entropy.grad[mask] < 0).all() and entropy.grad[~mask] == 0
    assert_close(entropy.grad, tensor([[-0.01 / 3] * 3 + [0.0]]))


# --- KL controllers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "current_kl, factor",
    [
        (9.0, 1 + 0.2 * 256 / 10000),  # 9 / 6 - 1 = 0.5, clipped to 0.2
        (0.0, 1 - 0.2 * 256 / 10000),  # -1, clipped to -0.2
        (6.6, 1 + 0.1 * 256 / 10000),  # 0.1, inside the band
        (6.0, 1.0),
    ],
)
def test_adaptive_kl_update(current_kl, factor):
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl, n_steps=256)
    assert controller.value == pytest.approx(0.1 * factor, rel=1e-12)


def test_kl_controller_state_round_trip():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(9.0, n_steps=256)
    restored = AdaptiveKLController(0.5, target=1.0, horizon=10)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()
    controller.update(3.0, 64)
    restored.update(3.0, 64)
    assert restored.value == controller.value
    assert all(type(v) is float for v in controller.state_dict().values())
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == fixed.value == 0.05


# --- log-probs and entropy ---------------------------------------------------------------------


def test_logprobs_from_logits_with_temperature():
    # logits [0, ln 3]: p = [1/4, 3/4]. At T = 2: [0, ln 3 / 2], p1 = sqrt 3 / (1 + sqrt 3).
    logits = tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    tokens = torch.tensor([[1, 0]])
    assert_close(logprobs_from_logits(logits, tokens), tensor([[math.log(0.75), math.log(0.25)]]))
    s3 = math.sqrt(3)
    expected = tensor([[math.log(s3 / (1 + s3)), math.log(1 / (1 + s3))]])
    assert_close(logprobs_from_logits(logits, tokens, temperature=2.0), expected)
    # Agrees with log_softmax(logits / T) and with the sampler's own log-probs, in float32.
    logits = torch.randn(2, 5, 11).bfloat16()
    tokens = torch.randint(0, 11, (2, 5))
    ours = logprobs_from_logits(logits, tokens, temperature=0.7)
    reference = (logits.float() / 0.7).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    assert ours.dtype == torch.float32
    assert_close(ours, reference)
    assert_close(ours, sampling_logprobs(logits, tokens, temperature=0.7))


def test_entropy_uniform_and_filtered():
    assert_close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    # Two live tokens at 1/2 each, the rest filtered to -inf: entropy ln 2, finite gradients.
    logits = tensor([[[1.0, 1.0, float("-inf"), float("-inf")]]]).requires_grad_()
    entropy = entropy_from_logits(logits)
    assert_close(entropy, tensor([[math.log(2)]]))
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
