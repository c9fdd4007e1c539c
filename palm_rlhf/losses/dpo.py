"""Pure DPO maths: sequence log-probs, implicit rewards, pairwise, K-wise and listwise losses.

Shapes: b = pairs (or rows), n = response length, N = completions in a flat batch. One mask
convention: `mask` (b, n) bool, True = keep (a real response token); masked entries are ignored
even when they hold inf or nan.

A log-ratio is log pi(y|x) - log pi_ref(y|x) summed over a response's tokens (`sequence_logprobs`
of the policy minus that of the reference), so beta * logratio is DPO's implicit reward
(Rafailov et al. 2023, eq. 5). DPO losses average per pair or per prompt, never per token: the
Bradley-Terry and Plackett-Luce models score whole sequences.

The K-wise layout is that of `palm_rlhf.losses.preference.ranking_loss`: a flat batch of N
completions with `ranks` (N,) int, lower is better, ties share a rank, and `group` (N,) int, the
prompt each completion answers. A prompt whose completions are all tied carries no preference:
it adds nothing to a loss and is not counted in its divisor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .masked import masked_mean
from .preference import better_than

LOSS_TYPES = ("sigmoid", "ipo")


def _check_beta(beta: float) -> None:
    if not beta > 0:  # also rejects nan
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_pair_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    _check_beta(beta)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0:
        raise ValueError(f"label_smoothing must be 0 with loss_type='ipo', got {label_smoothing}")


def _check_logratios(logratios: Tensor, ranks: Tensor) -> None:
    if logratios.ndim != 1 or logratios.shape != ranks.shape:
        raise ValueError(
            f"logratios must be (N,) like ranks {tuple(ranks.shape)}, got {tuple(logratios.shape)}"
        )


def _num_ranked_groups(better: Tensor, group: Tensor) -> int:
    """Prompts with at least one untied pair (equivalently, at least two tiers)."""
    return torch.unique(group[better.any(dim=1)]).numel()


def sequence_logprobs(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sum of log-probs over valid tokens: token_logprobs (b, n), mask (b, n) bool -> (b,),
    float32. Masked entries are ignored even if nan or inf, in the value and the gradient."""
    if token_logprobs.shape != mask.shape:
        raise ValueError(
            f"mask must have token_logprobs' shape {tuple(token_logprobs.shape)}, got "
            f"{tuple(mask.shape)}"
        )
    return token_logprobs.float().masked_fill(~mask.bool(), 0).sum(dim=-1)


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023, eq. 5,
    without the partition term, which cancels in every comparison). Sequence log-probs (b,)."""
    _check_beta(beta)
    return beta * (policy_logps.float() - ref_logps.float())


def dpo_pair_loss(
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair DPO losses (b,) (elementwise, so any matching shape works) with h = chosen -
    rejected log-ratio:

        sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                 (Rafailov et al. 2023, eq. 7; eps > 0 is conservative DPO, Mitchell 2023,
                 which assumes each label is flipped with probability eps)
        ipo      (h - 1 / (2 beta))^2   (Azar et al. 2023, eq. 17; eps must be 0)

    IPO regresses h onto a finite target instead of pushing it to infinity, so it does not
    overfit deterministic preferences.
    """
    _check_pair_args(beta, loss_type, label_smoothing)
    if chosen_logratio.shape != rejected_logratio.shape:
        raise ValueError(
            f"chosen_logratio and rejected_logratio must have one shape, got "
            f"{tuple(chosen_logratio.shape)} and {tuple(rejected_logratio.shape)}"
        )
    h = chosen_logratio.float() - rejected_logratio.float()
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    eps = label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def ranking_dpo_loss(
    logratios: Tensor,
    ranks: Tensor,
    group: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO over every untied pair of K ranked completions, normalised as InstructGPT's K-wise
    reward loss (Ouyang et al. 2022, eq. 1; `palm_rlhf.losses.preference.ranking_loss`): scalar.

    logratios, ranks, group (N,). For a prompt with K completions, every pair y_w ranked above
    y_l adds dpo_pair_loss(logratio_w, logratio_l) / C(K, 2); tied pairs add nothing. The sum
    over prompts is divided by the number of prompts with at least one untied pair. With K=2
    everywhere this is the mean of `dpo_pair_loss`.
    """
    _check_pair_args(beta, loss_type, label_smoothing)
    _check_logratios(logratios, ranks)
    better = better_than(ranks, group)  # (N, N): [i, j] True when i beats j
    logratios = logratios.float()
    num = logratios.shape[0]
    chosen = logratios[:, None].expand(num, num)  # (N, N): row i is the winner
    rejected = logratios[None, :].expand(num, num)
    pair_loss = dpo_pair_loss(chosen, rejected, beta, loss_type, label_smoothing)  # (N, N)
    k = (group[:, None] == group[None, :]).sum(dim=1)  # (N,) completions of row i's prompt
    pairs = (k * (k - 1) // 2).clamp(min=1).to(logratios.dtype)  # C(K, 2)
    terms = torch.where(better, pair_loss / pairs[:, None], 0.0)
    num_groups = _num_ranked_groups(better, group)
    if num_groups == 0:  # nothing to compare: a zero that still belongs to the graph
        return logratios.sum() * 0.0
    return terms.sum() / num_groups


def plackett_luce_loss(logratios: Tensor, ranks: Tensor, group: Tensor, beta: float) -> Tensor:
    """Listwise DPO: the Plackett-Luce negative log-likelihood of each prompt's ranking under the
    implicit rewards u = beta * logratio (Rafailov et al. 2023, appendix A.3), with ties as
    tiers: scalar.

    logratios, ranks, group (N,). A prompt's distinct ranks, best first, form tiers T_1 > ... >
    T_m; its loss is

        -sum_{t < m} sum_{i in T_t} [u_i - logsumexp({u_i} + {u_j : j in T_{t+1..m}})]

    so every response is preferred to every response below its tier, and tied responses never
    enter each other's terms. Without ties this is the usual Plackett-Luce likelihood; with K=2
    it is `dpo_pair_loss` (sigmoid). The mean is over prompts with at least two tiers.
    """
    _check_beta(beta)
    _check_logratios(logratios, ranks)
    better = better_than(ranks, group)  # (N, N)
    u = beta * logratios.float()  # (N,)
    eye = torch.eye(u.shape[0], dtype=torch.bool, device=u.device)
    competitors = eye | better  # (N, N): row i holds i and everything in the tiers below it
    lse = torch.where(competitors, u[None, :], float("-inf")).logsumexp(dim=1)  # (N,)
    # A response in its prompt's last tier beats nobody: it has no term of its own.
    terms = torch.where(better.any(dim=1), lse - u, 0.0)
    num_groups = _num_ranked_groups(better, group)
    if num_groups == 0:
        return u.sum() * 0.0
    return terms.sum() / num_groups


@torch.no_grad()
def preference_metrics(
    logratios: Tensor, ranks: Tensor, group: Tensor, beta: float
) -> dict[str, Tensor]:
    """Detached scalars over all untied pairs (w above l) of every prompt, with implicit rewards
    r = beta * logratio: reward_accuracy, the fraction with r_w > r_l strictly; reward_margin,
    the mean of r_w - r_l; chosen_reward and rejected_reward, the means of r_w and r_l;
    num_pairs, their count (float). All 0 when there is no untied pair."""
    _check_beta(beta)
    _check_logratios(logratios, ranks)
    better = better_than(ranks, group)  # (N, N)
    r = beta * logratios.float()  # (N,)
    chosen = r[:, None].expand_as(better)  # (N, N): [i, j] = r_i, i the better
    rejected = r[None, :].expand_as(better)
    return {
        "reward_accuracy": masked_mean((chosen > rejected).float(), better),
        "reward_margin": masked_mean(chosen - rejected, better),
        "chosen_reward": masked_mean(chosen, better),
        "rejected_reward": masked_mean(rejected, better),
        "num_pairs": better.sum().float(),
    }
