import math

import pytest
import torch
from conftest import (
    assert_close_f32,
    assert_same_run,
    count_checkpointed_blocks,
    save_policy_and_lora_reward,
    tiny_model,
)

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.model.palm import read_base_digest
from palm_rlhf.model.reward import RewardConfig, RewardModel
from palm_rlhf.rl.config import PPOConfig
from palm_rlhf.rl.online import load_reward_model
from palm_rlhf.rl.ppo import PPOTrainer
from palm_rlhf.rl.run_state import accumulation_divisors

TOK = ByteTokenizer()
PROMPTS = [f"p{i}:" for i in range(64)]
METRICS = (
    "score_mean",
    "kl_ref",
    "approx_kl",
    "clip_frac",
    "entropy",
    "value_loss",
    "response_len",
)


def policy_model(seed: int = 0) -> PaLM:
    return tiny_model(seed=seed, num_tokens=TOK.vocab_size, max_seq_len=64)


def even_bytes(prompts, responses):
    """Dense toy reward: the share of response characters with an even code point."""
    return [sum(ord(c) % 2 == 0 for c in r) / max(1, len(r)) for r in responses]


def config(**overrides) -> PPOConfig:
    values = dict(
        rollout_batch_size=16,
        minibatch_size=8,
        max_new_tokens=10,
        lr=1e-2,
        critic_lr=1e-2,
        kl_coef=0.01,
        no_eos_penalty=float("nan"),
        seed=0,
    )
    return PPOConfig(**{**values, **overrides})


def test_first_minibatch_ratio_is_exactly_one_and_metrics_are_logged(tmp_path):
    trainer = PPOTrainer(
        policy_model(),
        TOK,
        PROMPTS,
        reward_fn=even_bytes,
        config=config(),
        out_dir=tmp_path,
        show_progress=False,
    )
    history = trainer.train(2)
    for metrics in history:
        assert metrics["first_ratio_max_dev"] == 0.0
        for key in METRICS:
            assert math.isfinite(metrics[key]), key
    assert (tmp_path / "ppo_metrics.jsonl").read_text().count("\n") == 2
    # policy == reference at the start: the zero adapter adds exactly 0, the bits are the same
    assert history[0]["kl_ref"] == 0.0


def test_policy_improves_and_the_reference_stays_the_base():
    policy = policy_model()
    tokens = torch.randint(0, 256, (2, 12))
    base_logits = policy(tokens).detach()
    trainer = PPOTrainer(
        policy, TOK, PROMPTS, reward_fn=even_bytes, config=config(), show_progress=False
    )
    history = trainer.train(25)
    first = sum(h["score_mean"] for h in history[:3]) / 3
    last = sum(h["score_mean"] for h in history[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert history[-1]["kl_ref"] > 0
    # The reference is the base with adapters off: untouched by training, no copy kept.
    torch.testing.assert_close(policy(tokens), base_logits, atol=0, rtol=0)
    assert trainer.reference is policy
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert all(".adapters.actor." in n or ".adapters.critic." in n for n in trainable)


def test_actor_and_critic_never_share_parameters():
    trainer = PPOTrainer(
        policy_model(), TOK, PROMPTS, reward_fn=even_bytes, config=config(), show_progress=False
    )
    actor, critic = trainer.optimizer.param_groups
    assert {id(p) for p in actor["params"]}.isdisjoint(id(p) for p in critic["params"])
    before = {id(p): p.detach().clone() for g in (actor, critic) for p in g["params"]}
    trainer.train(1)
    changed = [not torch.equal(before[id(p)], p) for p in actor["params"]]
    assert any(changed)
    assert any(not torch.equal(before[id(p)], p) for p in critic["params"])


def test_no_eos_penalty_replaces_the_score():
    # Hand-made rollout: row 0 ended with eos, row 1 ran out of tokens. With a penalty of -1 the
    # unfinished row scores -1 whatever the reward says; with nan it keeps the reward.
    always_five = lambda prompts, responses: [5.0] * len(responses)  # noqa: E731
    tokens = torch.tensor([[97, TOK.eos_id, TOK.pad_id], [97, 98, 99]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rows = [[TOK.bos_id, 97]] * 2
    for penalty, expected in ((-1.0, [5.0, -1.0]), (float("nan"), [5.0, 5.0])):
        trainer = PPOTrainer(
            policy_model(),
            TOK,
            PROMPTS,
            reward_fn=always_five,
            config=config(no_eos_penalty=penalty, max_new_tokens=3),
            show_progress=False,
        )
        scores = trainer.engine.score(["a", "a"], ["a", "abc"], tokens, mask, rows)[1]
        assert scores.tolist() == expected
    # In a real rollout the score sits at the last real response token and nothing after it
    # gets an advantage (checklist 7, 8).
    rollout, _, _ = trainer.rollout(PROMPTS[:16])
    assert (rollout.advantages[~rollout.samples.response_mask] == 0).all()


def test_critic_starts_from_the_reward_model():
    torch.manual_seed(1)
    trunk = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    reward_model = RewardModel(trunk, RewardConfig(lora_rank=2))
    with torch.no_grad():
        for name, param in reward_model.named_parameters():
            if ".adapters.reward.up" in name:
                param.normal_(0, 0.5)
        reward_model.score_mean.fill_(5.0)
        reward_model.score_std.fill_(2.0)
    trainer = PPOTrainer(
        policy_model(),
        TOK,
        PROMPTS,
        reward_model=reward_model,
        config=config(),
        show_progress=False,
    )
    tokens = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        values = trainer.critic(tokens)  # (3, 9)
        # PPO's rewards are normalised scores, so the critic starts out predicting those (bug:
        # it returned the raw score, 0.38 against a reward of -2.31 in a probe).
        normalised = reward_model(tokens, normalized=True)
        assert_close_f32(values[:, -1], normalised)
        assert not torch.allclose(normalised, reward_model(tokens), atol=0.5)
    history = trainer.train(1)
    assert math.isfinite(history[0]["score_mean"])
    # The reward model itself is frozen.
    assert not any(p.requires_grad for p in reward_model.parameters())


def test_bad_arguments():
    with pytest.raises(
        ValueError, match="give a reward model, at least one reward function, or both"
    ):
        PPOTrainer(policy_model(), TOK, PROMPTS, config=config())
    with pytest.raises(ValueError, match="prompts is empty"):
        PPOTrainer(policy_model(), TOK, [], reward_fn=even_bytes, config=config())
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(rollout_batch_size=4, minibatch_size=8)
    trainer = PPOTrainer(
        policy_model(),
        TOK,
        PROMPTS,
        reward_fn=lambda p, r: [1.0],
        config=config(),
        show_progress=False,
    )
    with pytest.raises(ValueError, match="reward function 'reward_fn' returned 1 scores for 16"):
        trainer.train(1)


def test_resume_continues_the_same_run(tmp_path):
    def build():
        return PPOTrainer(
            policy_model(), TOK, PROMPTS, reward_fn=even_bytes, config=config(), show_progress=False
        )

    straight = build()
    straight.train(2)
    straight.save(tmp_path / "ppo")
    expected = straight.train(2)
    resumed = build()
    resumed.load(tmp_path / "ppo")
    assert resumed.iteration == 2
    got = resumed.train(2)
    for a, b in zip(expected, got, strict=True):
        assert a == b
    # A checkpoint from another config is refused by name.
    other = PPOTrainer(
        policy_model(),
        TOK,
        PROMPTS,
        reward_fn=even_bytes,
        config=config(kl_coef=0.5),
        show_progress=False,
    )
    with pytest.raises(ValueError, match="different PPOConfig"):
        other.load(tmp_path / "ppo")


@pytest.mark.parametrize("grad_accum, steps", [(1, 4), (2, 2), (3, 2)])
def test_gradient_accumulation_takes_one_step_per_group_of_minibatches(grad_accum, steps):
    trainer = PPOTrainer(
        policy_model(),
        TOK,
        PROMPTS,
        reward_fn=even_bytes,
        config=config(minibatch_size=4, grad_accum=grad_accum, ppo_epochs=1),
        show_progress=False,
    )
    trainer.train(1)
    param = trainer.optimizer.param_groups[0]["params"][0]
    assert int(trainer.optimizer.state[param]["step"]) == steps


@pytest.mark.parametrize(
    "chunks, grad_accum, expected",
    [(4, 1, [1, 1, 1, 1]), (4, 2, [2, 2, 2, 2]), (4, 3, [3, 3, 3, 1]), (5, 3, [3, 3, 3, 2, 2])],
)
def test_accumulation_divides_each_group_by_its_real_size(chunks, grad_accum, expected):
    # Bug caught: the last, shorter group of an epoch was divided by grad_accum, so its step
    # was a fraction of a full one.
    assert accumulation_divisors(chunks, grad_accum) == expected


def test_critic_ignores_adapter_scopes_the_reward_model_never_applies():
    # A reward model trained on a trunk that still carries a policy's "actor" adapter: the
    # reward model never applies it, so neither may the critic (bug: every scope was merged).
    torch.manual_seed(2)
    trunk = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    trunk.add_lora("actor", freeze_base=False)
    reward_model = RewardModel(trunk, RewardConfig(lora_rank=2))
    with torch.no_grad():
        for name, param in reward_model.named_parameters():
            if ".adapters." in name and ".up" in name:
                param.normal_(0, 0.5)
    trainer = PPOTrainer(
        policy_model(), TOK, PROMPTS, reward_model=reward_model, config=config(),
        show_progress=False,
    )  # fmt: skip
    tokens = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        assert_close_f32(trainer.critic(tokens)[:, -1], reward_model(tokens, normalized=True))


def test_a_bf16_policy_trains_with_a_reward_function():
    # Bug caught: the fresh value head was float32 while the trunk's hidden states were bf16.
    policy = policy_model().to(dtype=torch.bfloat16)
    trainer = PPOTrainer(
        policy, TOK, PROMPTS, reward_fn=even_bytes, config=config(), show_progress=False
    )
    metrics = trainer.train(1)[0]
    assert math.isfinite(metrics["value_loss"]) and math.isfinite(metrics["policy_loss"])


def test_reward_model_and_weighted_functions_sum_into_the_score(tmp_path):
    """PPO takes reward sources the way GRPO does: the score is w_rm * the reward model's
    normalised score + sum of w_i * fn_i, each source also logged on its own in reward_parts.
    A resume with other weights is refused (it would not continue the same objective)."""
    torch.manual_seed(1)
    trunk = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    reward_model = RewardModel(trunk, RewardConfig())

    def length(prompts, responses):
        return [float(len(r)) for r in responses]

    def build(weight: float) -> PPOTrainer:
        return PPOTrainer(
            policy_model(),
            TOK,
            PROMPTS,
            reward_model=reward_model,
            reward_fn=even_bytes,
            reward_fns=[("length", length, weight)],
            reward_model_weight=0.5,
            config=config(),  # no eos penalty, no clipping: the score is the weighted sum
            show_progress=False,
        )

    trainer = build(-0.25)
    assert trainer.engine.rewards.names == ["reward_model", "reward_fn", "length"]
    samples = trainer.engine.sample(trainer.prompts[:8])
    parts = samples.reward_parts  # (b, 3) raw scores, in names order
    expected = 0.5 * parts[:, 0] + parts[:, 1] - 0.25 * parts[:, 2]
    torch.testing.assert_close(samples.scores, expected, rtol=1e-6, atol=0)
    assert parts[:, 2].tolist() == [float(len(r)) for r in samples.responses]
    trainer.train(1)
    trainer.save(tmp_path / "state")
    with pytest.raises(ValueError, match="saved with rewards"):
        build(-0.5).load(tmp_path / "state")


def test_rollout_logprobs_from_hidden_states_equal_the_full_logits():
    """The engine's log-probs and entropies (chunked, never (b, p + n, v) logits) equal the
    full-logits computation at the sampling temperature, for the policy and the reference."""
    from palm_rlhf.losses.logprobs import entropy_from_logits, logprobs_from_logits
    from palm_rlhf.rl.rollout import response_logits

    trainer = PPOTrainer(
        policy_model(), TOK, PROMPTS, reward_fn=even_bytes, config=config(temperature=0.8),
        show_progress=False,
    )  # fmt: skip
    with torch.no_grad():
        for param in trainer.actor_params:
            param.normal_(0, 0.1)  # an adapter that changes the policy
    samples = trainer.engine.sample(trainer.prompts[:8])
    p, seq, mask = samples.prompt_len, samples.sequences, samples.sequence_mask
    with torch.no_grad():
        logprobs, entropy = trainer.engine.policy_logprobs(seq, mask, p, entropy=True)
        logits = response_logits(trainer.policy(seq, mask=mask, lora_scope="actor"), p)
        assert_close_f32(logprobs, logprobs_from_logits(logits, seq[:, p:], 0.8))
        assert_close_f32(entropy, entropy_from_logits(logits, 0.8))
        trajectory = trainer.engine.logprobs(samples, torch.arange(8), 4)
        reference = response_logits(trainer.policy(seq, mask=mask), p)
        assert_close_f32(trajectory.ref_logprobs, logprobs_from_logits(reference, seq[:, p:], 0.8))
        assert not torch.allclose(trajectory.ref_logprobs, trajectory.old_logprobs)


@pytest.mark.parametrize("with_reward_model", [False, True])
def test_activation_checkpointing_trains_the_same_run(monkeypatch, with_reward_model):
    """Actor and critic (on the policy's base, or on the reward model's trunk) recompute their
    blocks in backward and train exactly as without it."""
    calls = count_checkpointed_blocks(monkeypatch)
    runs = []
    for enabled in (False, True):
        reward = {"reward_fn": even_bytes}
        if with_reward_model:
            torch.manual_seed(1)
            reward = {"reward_model": RewardModel(policy_model(seed=1), RewardConfig())}
        trainer = PPOTrainer(
            policy_model(),
            TOK,
            PROMPTS,
            config=config(activation_checkpointing=enabled),
            show_progress=False,
            **reward,
        )
        runs.append(trainer.train(2))
        assert bool(calls) == enabled
    assert_same_run(*runs, keys=METRICS + ("policy_loss",))


@pytest.fixture
def policy_and_reward_dirs(tmp_path):
    return save_policy_and_lora_reward(policy_model(), tmp_path)


def test_one_base_serves_policy_reference_critic_and_reward(policy_and_reward_dirs, tmp_path):
    """A reward scope on the policy's own base (same digest) is loaded onto the policy: PPO then
    holds one trunk, and runs exactly as with a second copy of it (bug it catches: a deep copy
    of the reward trunk for the critic, twice the weights for nothing at Cohere's size)."""
    policy_dir, reward_dir = policy_and_reward_dirs
    shared_policy = PaLM.from_pretrained(policy_dir)
    shared_reward, notice = load_reward_model(reward_dir, shared_policy, policy_dir)
    assert notice is None and shared_reward.trunk is shared_policy
    separate_policy = PaLM.from_pretrained(policy_dir)
    separate_reward = RewardModel.from_pretrained(reward_dir)
    tokens = torch.randint(0, TOK.vocab_size, (3, 9))
    with torch.no_grad():  # the same reward model either way
        assert_close_f32(shared_reward(tokens, normalized=True),
                         separate_reward(tokens, normalized=True))  # fmt: skip

    settings = config(lora_rank=4, ppo_epochs=1, minibatch_size=16)  # one step per iteration
    runs = []
    for policy, reward in ((shared_policy, shared_reward), (separate_policy, separate_reward)):
        trainer = PPOTrainer(
            policy, TOK, PROMPTS, reward_model=reward, config=settings, show_progress=False
        )
        runs.append(trainer.train(1))
        if policy is shared_policy:
            shared = trainer
    # Iteration 1 (sampling, scores, critic values, losses) is the same: the critic starts as
    # the reward model either way; afterwards their parametrisations differ.
    assert_same_run(*runs, keys=("score_mean", "kl_ref", "value_loss", "policy_loss", "entropy"))

    trunks = {id(m) for m in shared.critic.modules() if isinstance(m, PaLM)}
    trunks |= {id(shared.policy), id(shared.reference), id(shared_reward.trunk)}
    assert trunks == {id(shared_policy)}
    assert sorted(shared_policy.lora_configs) == ["actor", "critic", "reward"]
    # The policy saves as a policy: its actor scope only, on the unchanged base.
    shared_policy.save_pretrained(tmp_path / "saved", scopes=["actor"])
    saved = PaLM.from_pretrained(tmp_path / "saved")
    assert sorted(saved.lora_configs) == ["actor"]
    assert read_base_digest(tmp_path / "saved") == read_base_digest(policy_dir)


def test_a_reward_model_on_another_base_gets_its_own_trunk_with_a_notice(
    policy_and_reward_dirs, tmp_path
):
    policy_dir, reward_dir = policy_and_reward_dirs
    other = policy_model(seed=3)
    other.save_pretrained(tmp_path / "other")
    policy = PaLM.from_pretrained(tmp_path / "other")
    reward, notice = load_reward_model(reward_dir, policy, tmp_path / "other")
    assert reward.trunk is not policy
    assert "its base weights differ from the policy's" in notice and "GB more" in notice
    # a full fine-tune never shares its base: training it would change the reward
    policy = PaLM.from_pretrained(policy_dir)
    reward, notice = load_reward_model(reward_dir, policy, policy_dir, share_base=False)
    assert reward.trunk is not policy and "full_finetune" in notice
    shared, _ = load_reward_model(reward_dir, policy, policy_dir)
    with pytest.raises(ValueError, match="full_finetune: the policy's base is the reward"):
        PPOTrainer(policy, TOK, PROMPTS, reward_model=shared, config=config(full_finetune=True))
