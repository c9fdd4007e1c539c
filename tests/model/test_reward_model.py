"""Reward model: losses against hand-computed numbers, last-token pooling under padding, head
init, normalisation, LoRA freezing, bitwise save/load, and a step that widens the margin."""

import json
import math

import pytest
import torch
from conftest import assert_close_f32

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.losses.preference import (
    pairwise_accuracy,
    pairwise_loss,
    ranking_loss,
    rating_loss,
    rating_regression_loss,
)
from palm_rlhf.model.reward import RewardConfig, RewardModel, pool_last

CONFIG = PaLMConfig(num_tokens=259, dim=32, depth=2, heads=2, dim_head=16, max_seq_len=128)


def sp(x: float) -> float:
    """softplus: -log sigmoid(-x) = log(1 + e^x)."""
    return math.log(1 + math.exp(x))


def make_reward(config: RewardConfig | None = None, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    palm = PaLM(CONFIG)
    with torch.no_grad():  # bigger than the default init, so rows score clearly apart
        for param in palm.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.3)
    return RewardModel(palm, config or RewardConfig()).eval()


def perturb_adapters(model: RewardModel) -> None:
    with torch.no_grad():  # a new adapter is a no-op; make it matter
        for name, param in model.named_parameters():
            if ".adapters.reward." in name:
                param.normal_(0, 0.3)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------- losses


def test_pairwise_loss_hand_computed_and_margin():
    chosen, rejected = t([1.0, -0.5]), t([0.0, 0.5])
    expected = (sp(-1.0) + sp(1.0)) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # A margin m shifts the difference: -log sigmoid(d - m) = sp(m - d).
    expected = (sp(0.5 - 1.0) + sp(0.5 + 1.0)) / 2
    assert pairwise_loss(chosen, rejected, margin=0.5).item() == pytest.approx(expected, rel=1e-6)
    per_pair = t([0.0, 2.0])
    expected = (sp(-1.0) + sp(2.0 + 1.0)) / 2
    assert pairwise_loss(chosen, rejected, per_pair).item() == pytest.approx(expected, rel=1e-6)


def test_ranking_loss_k3_hand_computed():
    scores, ranks, group = t([2.0, 0.0, -1.0]), t([0, 1, 2], torch.long), t([0, 0, 0], torch.long)
    # pairs (0>1): d=2, (0>2): d=3, (1>2): d=1, each / C(3, 2) = 3
    expected = (sp(-2) + sp(-3) + sp(-1)) / 3
    assert ranking_loss(scores, ranks, group).item() == pytest.approx(expected, rel=1e-6)
    # Order within the flat batch does not matter.
    perm = torch.tensor([2, 0, 1])
    loss = ranking_loss(scores[perm], ranks[perm], group[perm])
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ties_contribute_no_pair():
    scores, group = t([2.0, 0.0, -1.0]), t([0, 0, 0], torch.long)
    ranks = t([0, 1, 0], torch.long)  # responses 0 and 2 tie for best
    # untied pairs: (0>1): d=2, (2>1): d=-1; still weighted 1 / C(3, 2)
    expected = (sp(-2) + sp(1)) / 3
    assert ranking_loss(scores, ranks, group).item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy(scores, ranks, group) == (1, 2)
    all_tied = ranking_loss(scores.requires_grad_(), t([0, 0, 0], torch.long), group)
    assert all_tied.item() == 0.0 and all_tied.requires_grad


def test_two_groups_average_per_group():
    # group 7: K=2, d=1; group 3: K=3 with scores [2, 0, -1] ranked 0<1<2
    scores = t([1.0, 2.0, 0.0, 0.0, -1.0])
    ranks = t([0, 0, 1, 1, 2], torch.long)
    group = t([7, 3, 7, 3, 3], torch.long)
    expected = (sp(-1) / 1 + (sp(-2) + sp(-3) + sp(-1)) / 3) / 2
    assert ranking_loss(scores, ranks, group).item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy(scores, ranks, group) == (4, 4)


def test_k2_ranking_loss_equals_pairwise_loss():
    chosen, rejected = torch.randn(6), torch.randn(6)
    scores = torch.stack([chosen, rejected], dim=1).reshape(-1)  # c0 r0 c1 r1 ...
    ranks = torch.tensor([0, 1] * 6)
    group = torch.arange(6).repeat_interleave(2)
    torch.testing.assert_close(ranking_loss(scores, ranks, group), pairwise_loss(chosen, rejected))
    torch.testing.assert_close(
        ranking_loss(scores, ranks, group, margin=0.3), pairwise_loss(chosen, rejected, 0.3)
    )


def test_pairwise_accuracy_counts():
    scores = t([3.0, 1.0, 2.0, 0.5, 0.5])
    ranks = t([0, 1, 2, 0, 1], torch.long)
    group = t([0, 0, 0, 1, 1], torch.long)
    # group 0: (0>1) yes, (0>2) yes, (1>2) no; group 1: equal scores are not correct
    assert pairwise_accuracy(scores, ranks, group) == (2, 4)


def test_rating_losses_hand_computed():
    logits = t([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    ratings = t([1, 2], torch.long)
    log_z = math.log(math.exp(1) + math.exp(2) + 1)
    expected = ((log_z - 2.0) + math.log(3)) / 2
    assert rating_loss(logits, ratings).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="ratings must lie in"):
        rating_loss(logits, t([1, 3], torch.long))
    value = rating_regression_loss(t([1.0, 0.0]), t([3, 1], torch.long)).item()
    assert value == pytest.approx((4 + 1) / 2)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="chosen and rejected"):
        pairwise_loss(t([1.0, 2.0]), t([1.0]))
    with pytest.raises(ValueError, match="ranks and group"):
        ranking_loss(t([1.0, 2.0]), t([0, 1], torch.long), t([0], torch.long))
    with pytest.raises(ValueError, match="integer"):
        ranking_loss(t([1.0, 2.0]), t([0.0, 1.0]), t([0, 0], torch.long))


# ----------------------------------------------------------------------------- model


def test_pool_last_reads_last_true():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[True, True, False, False], [False, True, True, True]])
    assert pool_last(hidden, mask).squeeze(-1).tolist() == [1.0, 7.0]
    assert pool_last(hidden).squeeze(-1).tolist() == [3.0, 7.0]
    with pytest.raises(ValueError, match="at least one real token"):
        pool_last(hidden, torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_scores(side):
    model = make_reward()
    rows = [[257, 5, 9, 30, 2, 258], [257, 100, 258], [257, 7, 8, 9, 10, 11, 12, 258]]
    n = max(map(len, rows))
    tokens = torch.full((len(rows), n), 256)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(n - len(row), n) if side == "left" else slice(0, len(row))
        tokens[i, span], mask[i, span] = torch.tensor(row), True
    with torch.no_grad():
        batched = model(tokens, mask)
        alone = torch.cat([model(torch.tensor([row])) for row in rows])
    assert len(set(alone.tolist())) == len(rows)  # the rows really score differently
    assert_close_f32(batched, alone)


def test_head_init_std():
    torch.manual_seed(0)
    palm = PaLM(PaLMConfig(num_tokens=259, dim=256, depth=1, heads=2, dim_head=16))
    target = 1 / math.sqrt(256 + 1)
    # Eight fresh models on one trunk: 2048 scalar-head weights, so 10% is ~6 standard errors.
    models = [RewardModel(palm, RewardConfig(rating_bins=8)) for _ in range(8)]
    scalar = torch.cat([m.head.weight.flatten() for m in models])
    rating = torch.cat([m.rating_head.weight.flatten() for m in models])
    for weights in (scalar, rating):
        assert abs(weights.std().item() / target - 1) < 0.1
    for head in (models[0].head, models[0].rating_head):
        assert torch.equal(head.bias, torch.zeros_like(head.bias))


def test_normalization():
    model = make_reward()
    tokens = torch.randint(0, 256, (6, 10))
    with torch.no_grad():
        raw = model(tokens)
        model.set_normalization(raw)
        normalized = model(tokens, normalized=True)
    assert model.score_mean.item() == pytest.approx(raw.mean().item(), rel=1e-6)
    assert model.score_std.item() == pytest.approx(raw.std(correction=0).item(), rel=1e-6)
    torch.testing.assert_close(normalized, (raw - raw.mean()) / raw.std(correction=0))
    assert abs(normalized.mean().item()) < 1e-5
    model.set_normalization(torch.full((4,), 2.5))  # constant scores: std clamped, not 0
    assert model.score_mean.item() == 2.5 and model.score_std.item() == pytest.approx(1e-6)
    assert {"score_mean", "score_std"} <= set(model.state_dict())


def test_rating_logits():
    tokens = torch.randint(0, 256, (3, 7))
    logits = make_reward(RewardConfig(rating_bins=5)).rating_logits(tokens)
    assert logits.shape == (3, 5)
    with pytest.raises(ValueError, match="no rating head"):
        make_reward().rating_logits(tokens)


def test_lora_variant_trains_only_adapters_and_heads():
    model = make_reward(RewardConfig(rating_bins=3, lora_rank=4, lora_alpha=8.0)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }
    for name in trainable:
        assert ".adapters.reward." in name or name.startswith(("head.", "rating_head.")), name
    assert any(".adapters.reward." in n for n in trainable)
    base = {k: v.clone() for k, v in model.trunk.state_dict().items() if ".adapters." not in k}
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    tokens = torch.randint(0, 256, (4, 9))
    pairwise_loss(*model(tokens).reshape(2, 2)).backward()
    optimizer.step()
    for key, value in base.items():
        assert torch.equal(model.trunk.state_dict()[key], value), key


def test_full_finetune_trains_everything():
    model = make_reward()
    assert all(p.requires_grad for p in model.parameters())
    assert len(model.trainable_parameters()) == len(list(model.parameters()))


@pytest.mark.parametrize("config", [RewardConfig(), RewardConfig(rating_bins=4, lora_rank=2)])
def test_save_load_round_trip_is_bitwise(tmp_path, config):
    model = make_reward(config)
    perturb_adapters(model)
    tokens = torch.randint(0, 256, (3, 8))
    with torch.no_grad():
        model.set_normalization(model(tokens) * 3 + 1)
    model.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert loaded.config == config and loaded.trunk.config == CONFIG
    original, restored = model.state_dict(), loaded.state_dict()
    assert sorted(original) == sorted(restored)
    for name, value in original.items():
        assert torch.equal(restored[name], value), name
    # The weights are bitwise equal (above); the outputs may differ in the last bits, since the
    # loaded tensors sit at the file's offsets (not 64-byte aligned) and CPU kernels pick their
    # vector path by alignment.
    with torch.no_grad():
        assert_close_f32(loaded(tokens, normalized=True), model(tokens, normalized=True))
    saved = json.loads((tmp_path / "rm" / "reward_config.json").read_text())
    assert saved == config.to_dict()
    assert (tmp_path / "rm" / "lora.json").exists() == (config.lora_rank > 0)
    if config.lora_rank:  # the trunk stays frozen after loading
        assert all(
            p.requires_grad == (".adapters." in n) for n, p in loaded.trunk.named_parameters()
        )


def test_from_palm_checkpoint_and_plain_palm_dir(tmp_path):
    palm = make_reward().trunk
    palm.save_pretrained(tmp_path / "palm")
    model = RewardModel.from_palm_checkpoint(tmp_path / "palm", RewardConfig(lora_rank=2))
    for name, value in palm.state_dict().items():
        assert torch.equal(model.trunk.state_dict()[name], value), name
    with pytest.raises(ValueError, match="reward_config.json"):
        RewardModel.from_pretrained(tmp_path / "palm")


def test_config_validation_and_round_trip():
    config = RewardConfig(rating_bins=5, lora_rank=8, lora_alpha=4.0, pairwise_margin=0.5)
    assert RewardConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (
        dict(rating_bins=1),
        dict(rating_bins=-2),
        dict(lora_rank=True),
        dict(lora_alpha=0.0),
        dict(pairwise_margin=-1.0),
        dict(pairwise_margin=float("nan")),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RewardConfig(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        RewardConfig.from_dict({"rating_bin": 3})


def test_gradient_step_widens_the_margin():
    model = make_reward().train()
    chosen = torch.randint(0, 256, (4, 10))
    rejected = torch.randint(0, 256, (4, 10))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.05)

    def margin() -> torch.Tensor:
        return model(chosen) - model(rejected)

    before = margin().detach()
    pairwise_loss(model(chosen), model(rejected)).backward()
    optimizer.step()
    with torch.no_grad():
        assert margin().mean() > before.mean()
