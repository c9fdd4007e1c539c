"""GRPOTrainer: the critic-free loop on one process (two processes: test_multiprocess.py)."""

import json
import math
import warnings

import pytest
import torch
from conftest import (
    assert_same_run,
    count_checkpointed_blocks,
    save_policy_and_lora_reward,
    tiny_model,
)

from palm_rlhf import ByteTokenizer, LoRAConfig, PaLM, PaLMConfig
from palm_rlhf.data.prompts import PromptRecord
from palm_rlhf.model.reward import RewardConfig, RewardModel
from palm_rlhf.rl.config import GRPOConfig, PPOConfig
from palm_rlhf.rl.grpo import GRPOTrainer
from palm_rlhf.rl.online import load_reward_model

TOK = ByteTokenizer()
PROMPTS = [f"p{i}:" for i in range(64)]


def policy_model(seed: int = 0) -> PaLM:
    return tiny_model(seed=seed, num_tokens=TOK.vocab_size, max_seq_len=64)


def share_of_a(prompts, responses, **columns):
    """Dense toy reward: the share of 'a' among the response's characters."""
    return [r.count("a") / max(1, len(r)) for r in responses]


def even_bytes(prompts, responses, **columns):
    """A reward that differs between almost any two responses."""
    return [sum(ord(c) % 2 == 0 for c in r) / max(1, len(r)) for r in responses]


def config(**overrides) -> GRPOConfig:
    values = dict(
        prompts_per_iteration=4,
        group_size=4,
        minibatch_size=8,
        max_new_tokens=8,
        lr=1e-2,
        no_eos_penalty=float("nan"),
        seed=0,
    )
    return GRPOConfig(**{**values, **overrides})


def trainer_for(reward_fns=(share_of_a,), prompts=PROMPTS, out_dir=None, **overrides):
    return GRPOTrainer(
        policy_model(),
        TOK,
        prompts,
        reward_fns=reward_fns,
        config=config(**overrides),
        show_progress=False,
        out_dir=out_dir,
    )


def test_first_ratio_is_exactly_one_and_metrics_and_samples_are_logged(tmp_path):
    trainer = GRPOTrainer(
        policy_model(),
        TOK,
        PROMPTS,
        reward_fns=[("share_of_a", share_of_a, 2.0)],
        config=config(log_samples=3),
        out_dir=tmp_path,
        show_progress=False,
    )
    history = trainer.train(2)
    for metrics in history:
        # The old log-probs are the sampler's (the cached decode's): the first minibatch's
        # ratio is 1 within float rounding, not exactly (test below for the recomputed ones).
        assert metrics["first_ratio_max_dev"] <= 1e-5
        # Each reward source first, then the shaped score.
        assert list(metrics)[:5] == [
            "reward/share_of_a",
            "reward/share_of_a_std",
            "score_mean",
            "score_std",
            "score_shaped_share",
        ]
        assert metrics["score_shaped_share"] == 0.0
        for key in (
            "score_mean",
            "score_std",
            "reward/share_of_a",
            "reward/share_of_a_std",
            "clip_frac_low",
            "clip_frac_high",
            "kl_ref",
            "kl_k3",
            "response_len",
            "groups_uninformative",
            "policy_loss",
        ):
            assert math.isfinite(metrics[key]), key
        # The score is the weighted sum: 2 x the function's value.
        assert metrics["score_mean"] == pytest.approx(2 * metrics["reward/share_of_a"])
    lines = (tmp_path / "grpo_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]
    sample_lines = (tmp_path / "grpo_samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in sample_lines]
    assert len(samples) == 6 and {"prompt", "response", "score"} <= set(samples[0])


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_sampler_logprobs_save_the_old_pass_and_match_a_recomputed_one(monkeypatch, estimator):
    # Default: no forward runs for the old log-probs, only the update's (one per minibatch).
    # recompute_old_logprobs: one more per minibatch before the update, and a first ratio of
    # exactly 1. Both runs sample the same responses from the same seed, and their updates
    # agree to float rounding: the sampler drew from the distribution the ratio needs.
    runs = {}
    for recompute in (False, True):
        trainer = trainer_for(
            estimator=estimator, max_new_tokens=16, recompute_old_logprobs=recompute
        )
        calls = []

        def counted(*args, forward=trainer.engine.policy_logprobs, calls=calls, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        monkeypatch.setattr(trainer.engine, "policy_logprobs", counted)
        history = trainer.train(2)
        minibatches = 2 * (4 * 4 // 8)  # 2 iterations of 16 responses in minibatches of 8
        assert len(calls) == minibatches * (2 if recompute else 1)
        runs[recompute] = history
    assert all(m["first_ratio_max_dev"] == 0.0 for m in runs[True])
    assert all(0 < m["first_ratio_max_dev"] <= 1e-5 for m in runs[False])
    # The first iteration samples the same responses (later ones may differ by a draw that
    # rounding moved across a boundary).
    sampled, recomputed = runs[False][0], runs[True][0]
    assert sampled["reward/share_of_a"] == recomputed["reward/share_of_a"]
    assert sampled["policy_loss"] == pytest.approx(recomputed["policy_loss"], abs=1e-5)
    assert sampled["kl_ref"] == pytest.approx(recomputed["kl_ref"], abs=1e-4)


def test_defaults_keep_the_users_score_and_shaping_that_rewrites_most_scores_warns_once():
    # The bug: no_eos_penalty defaulted to -1, so a model that rarely ends within
    # max_new_tokens had nearly every score replaced and learned to stop, not to raise the
    # reward. Now nothing is replaced unless asked, and asking loudly says what it did.
    assert math.isnan(GRPOConfig().no_eos_penalty) and math.isnan(PPOConfig().no_eos_penalty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shaping warning by default
        plain = trainer_for(max_new_tokens=2, no_eos_penalty=GRPOConfig().no_eos_penalty)
        metrics = plain.train(1)[0]
    assert metrics["score_shaped_share"] == 0.0
    assert metrics["score_mean"] == metrics["reward/share_of_a"]
    shaped = trainer_for(max_new_tokens=2, no_eos_penalty=-1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = shaped.train(3)
    messages = [str(w.message) for w in caught if "shaping" in str(w.message)]
    assert len(messages) == 1, messages  # once per run, not once per iteration
    assert "no_eos_penalty=-1" in messages[0] and "score_shaped_share" in messages[0]
    ended = [m["eos_rate"] for m in history]
    # The share is what the penalty did: every response that did not end was rewritten.
    for m, eos_rate in zip(history, ended, strict=True):
        assert m["score_shaped_share"] == pytest.approx(1 - eos_rate)
        assert m["score_shaped_share"] > 0.2


def test_a_clip_that_changes_few_scores_stays_quiet():
    # score_clip far above every score changes none: no warning, share 0.
    trainer = trainer_for(score_clip=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = trainer.train(1)[0]
    assert metrics["score_shaped_share"] == 0.0


def test_grpo_raises_a_simple_reward():
    trainer = trainer_for(prompts_per_iteration=8, group_size=8, minibatch_size=32, lr=3e-2)
    history = trainer.train(12)
    first = sum(m["score_mean"] for m in history[:3]) / 3
    last = sum(m["score_mean"] for m in history[-3:]) / 3
    assert last > first + 0.1, (first, last)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(estimator="grpo", loss_type="grpo", scale_rewards="group"),
        dict(estimator="grpo", loss_type="dapo", scale_rewards="batch", clip_high=0.28),
        dict(estimator="grpo", loss_type="dr_grpo", scale_rewards="none"),
        dict(estimator="grpo", loss_type="gspo", clip=3e-4, clip_high=4e-4),
        dict(estimator="rloo"),
        dict(estimator="reinforce_pp", group_size=1, minibatch_size=4),
        dict(estimator="reinforce_pp_baseline", grad_accum=2, minibatch_size=4),
    ],
)
def test_every_estimator_and_aggregation_trains(overrides):
    trainer = trainer_for(reward_fns=[even_bytes], **overrides)
    before = [p.detach().clone() for p in trainer.optimizer.param_groups[0]["params"]]
    history = trainer.train(2)
    assert all(math.isfinite(m["policy_loss"]) for m in history)
    after = trainer.optimizer.param_groups[0]["params"]
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_kl_coef_zero_runs_no_reference_pass(monkeypatch):
    trainer = trainer_for(kl_coef=0.0)
    calls = []
    original = trainer.policy.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("lora_scope"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer.policy, "forward", spy)
    metrics = trainer.step()
    # Every full forward runs the actor scope: none ran the base alone (the reference).
    assert calls and all(scope == "actor" for scope in calls)
    assert metrics["kl_ref"] == 0.0 and "kl_k3" not in metrics
    trainer_with_kl = trainer_for(kl_coef=0.1)
    calls.clear()
    monkeypatch.setattr(trainer_with_kl.policy, "forward", spy)
    trainer_with_kl.step()
    assert None in calls


def test_reward_functions_receive_the_prompt_rows_extra_fields():
    seen = {}

    def exact(prompts, responses, answer, source):
        seen["answer"], seen["source"], seen["prompts"] = answer, source, prompts
        return [float(r == a) for r, a in zip(responses, answer, strict=True)]

    records = [PromptRecord(f"q{i}", {"answer": str(i), "source": "s"}) for i in range(8)]
    records.append(PromptRecord("q8", {"answer": "8"}))  # a row without "source": None
    trainer = trainer_for(reward_fns=[exact], prompts=records, prompts_per_iteration=9)
    trainer.step()
    # Each response comes with its own prompt's fields, group_size times in a row.
    for prompt, answer, source in zip(seen["prompts"], seen["answer"], seen["source"], strict=True):
        record = next(r for r in records if r.prompt == prompt)
        assert answer == record.fields["answer"] and source == record.fields.get("source")
    assert None in seen["source"]


def test_a_function_that_cannot_take_the_fields_gets_a_clear_error():
    records = [PromptRecord(f"q{i}", {"answer": "1"}) for i in range(4)]
    trainer = trainer_for(reward_fns=[lambda p, r: [0.0] * len(r)], prompts=records)
    with pytest.raises(TypeError, match=r"extra fields \['answer'\]"):
        trainer.step()


def test_reward_model_and_function_mix_with_weights():
    torch.manual_seed(1)
    trunk = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    model = RewardModel(trunk, RewardConfig(lora_rank=0))
    trainer = GRPOTrainer(
        policy_model(),
        TOK,
        PROMPTS,
        reward_model=model,
        reward_model_weight=0.5,
        reward_fns=[("share_of_a", share_of_a, 3.0)],
        config=config(),
        show_progress=False,
    )
    samples, _ = trainer.collect()
    parts = samples.reward_parts
    assert trainer.engine.rewards.names == ["reward_model", "share_of_a"]
    torch.testing.assert_close(samples.scores, 0.5 * parts[:, 0] + 3.0 * parts[:, 1])
    assert torch.equal(parts[:, 1], torch.tensor(share_of_a(None, samples.responses)))


def constant_for_even_prompts(prompts, responses, **columns):
    """All-equal rewards (uninformative groups) for even-numbered prompts, all-distinct ones
    for odd-numbered prompts."""
    return [1.0 if int(p[1:-1]) % 2 == 0 else float(i) for i, p in enumerate(prompts)]


def test_dynamic_sampling_keeps_only_informative_groups():
    trainer = trainer_for(reward_fns=[constant_for_even_prompts], dynamic_sampling=True)
    samples, metrics = trainer.collect()
    assert len(samples.prompts) == 4 * 4
    assert all(int(p[1:-1]) % 2 == 1 for p in samples.prompts)
    # Two rounds of 4 prompts were drawn; the even ones among them were dropped.
    assert metrics["sampling_rounds"] == 2 and metrics["groups_topped_up"] == 0
    assert trainer.prompt_cursor == 8
    drawn = [int(PROMPTS[i][1:-1]) for i in trainer.prompt_schedule.items(0, 8)]
    assert metrics["groups_dropped"] == pytest.approx(sum(n % 2 == 0 for n in drawn) / 8)
    # The kept groups are the first informative ones, in the order they were drawn.
    odd = [f"p{n}:" for n in drawn if n % 2 == 1][:4]
    assert samples.prompts[::4] == odd


def test_dynamic_sampling_tops_up_at_the_cap():
    always_one = lambda prompts, responses: [1.0] * len(responses)  # noqa: E731
    trainer = trainer_for(reward_fns=[always_one], dynamic_sampling=True, max_sampling_rounds=3)
    samples, metrics = trainer.collect()
    assert len(samples.prompts) == 16  # the batch is always full
    assert metrics["sampling_rounds"] == 3 and metrics["groups_topped_up"] == 4
    assert metrics["groups_dropped"] == 1.0
    trainer.step()  # zero advantages everywhere: a step that changes nothing but still runs


def never_ending(trainer: GRPOTrainer) -> None:
    """Make the policy never choose eos, so every response is truncated."""

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor):  # sampling's logits, not the training statistics
            output[..., TOK.eos_id] = -1e4
        return output

    trainer.policy.register_forward_hook(hook)


def test_mask_truncated_leaves_truncated_responses_out_of_the_loss():
    trainer = trainer_for(mask_truncated=True, kl_coef=0.0)
    never_ending(trainer)
    before = [p.detach().clone() for p in trainer.optimizer.param_groups[0]["params"]]
    metrics = trainer.step()
    assert metrics["eos_rate"] == 0.0 and metrics["policy_loss"] == 0.0
    after = trainer.optimizer.param_groups[0]["params"]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_overlong_penalty_is_added_to_the_scores():
    zero = lambda prompts, responses: [0.0] * len(responses)  # noqa: E731
    trainer = trainer_for(reward_fns=[zero], overlong_buffer=4, overlong_penalty=2.0)
    never_ending(trainer)
    samples, _ = trainer.collect()
    # Every response has all 8 tokens: the full penalty, -2.
    assert samples.response_mask.sum(dim=1).eq(8).all()
    assert samples.scores.eq(-2.0).all()


def test_resume_continues_the_same_run(tmp_path):
    def build():
        return trainer_for(loss_type="dapo", dynamic_sampling=True, out_dir=tmp_path / "run")

    straight = build()
    straight.train(2)
    straight.save(tmp_path / "state")
    expected = straight.train(2)
    resumed = build()
    resumed.load(tmp_path / "state")
    assert resumed.iteration == 2
    got = resumed.train(2)
    assert got == expected
    for a, b in zip(
        straight.trainable_state().values(), resumed.trainable_state().values(), strict=True
    ):
        assert torch.equal(a, b)
    # The metrics file holds each iteration once.
    lines = (tmp_path / "run" / "grpo_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]


def test_resume_refuses_a_different_config(tmp_path):
    trainer = trainer_for()
    trainer.train(1)
    trainer.save(tmp_path / "state")
    with pytest.raises(ValueError, match="different GRPOConfig"):
        trainer_for(group_size=2).load(tmp_path / "state")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="estimator"):
        GRPOConfig(estimator="ppo")
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="token")
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(estimator="rloo", group_size=1)
    with pytest.raises(ValueError, match="minibatch_size"):
        GRPOConfig(prompts_per_iteration=2, group_size=2, minibatch_size=8)
    with pytest.raises(ValueError, match="distinct names"):
        trainer_for(reward_fns=[share_of_a, share_of_a])
    with pytest.raises(ValueError, match="reward model, at least one reward function"):
        trainer_for(reward_fns=[])


def test_an_adapter_the_starting_checkpoint_carries_is_merged_not_ignored(tmp_path):
    # Bug caught: `grpo --policy DPO_OUT` sampled from the bare base, the "dpo" adapter unused.
    torch.manual_seed(3)
    start = policy_model()
    start.add_lora("dpo", LoRAConfig(rank=2, alpha=4))
    with torch.no_grad():
        for name, param in start.named_parameters():
            if ".dpo." in name:
                param.normal_(0, 0.5)
    start.save_pretrained(tmp_path / "dpo_policy")
    tokens = torch.tensor([[TOK.bos_id, 97, 98, 99]])
    expected = start(tokens, lora_scope="dpo")
    assert not torch.allclose(expected, start(tokens))  # the adapter matters
    trainer = GRPOTrainer(
        PaLM.from_pretrained(tmp_path / "dpo_policy"), TOK, PROMPTS, reward_fns=[share_of_a],
        config=config(), show_progress=False,
    )  # fmt: skip
    # The policy (actor adapter still zero) and the reference (adapters off) are the DPO model.
    torch.testing.assert_close(trainer.policy(tokens, lora_scope="actor"), expected)
    torch.testing.assert_close(trainer.reference(tokens), expected)
    two = policy_model()
    two.add_lora("a", LoRAConfig(rank=2))
    two.add_lora("b", LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"several adapter scopes \['a', 'b'\]"):
        GRPOTrainer(two, TOK, PROMPTS, reward_fns=[share_of_a], config=config())


def test_reward_function_errors_are_the_functions_own():
    def broken(prompts, responses, answer):
        return [len(None) for _ in responses]  # a TypeError inside the body

    records = [PromptRecord(f"q{i}", {"answer": "1"}) for i in range(4)]
    with pytest.raises(TypeError, match="NoneType"):
        trainer_for(reward_fns=[broken], prompts=records).step()
    clash = [PromptRecord(f"q{i}", {"responses": "x"}) for i in range(4)]
    with pytest.raises(ValueError, match=r"fields named \['responses'\]"):
        trainer_for(prompts=clash).step()


def test_resume_refuses_other_reward_weights(tmp_path):
    trainer = trainer_for(reward_fns=[("a", share_of_a, 1.0)])
    trainer.train(1)
    trainer.save(tmp_path / "state")
    with pytest.raises(ValueError, match="same rewards and weights"):
        trainer_for(reward_fns=[("a", share_of_a, 2.0)]).load(tmp_path / "state")


def test_activation_checkpointing_trains_the_same_run(monkeypatch):
    calls = count_checkpointed_blocks(monkeypatch)
    runs = []
    for enabled in (False, True):
        runs.append(trainer_for(activation_checkpointing=enabled).train(2))
        assert bool(calls) == enabled
    assert_same_run(*runs, keys=("score_mean", "policy_loss", "kl_ref", "kl_k3", "clip_frac_low"))


def test_a_reward_model_on_the_policys_base_shares_it(tmp_path):
    """GRPO scores with the reward scope on the policy's own base: the same run as with the
    reward model on a trunk of its own, and the reward scope is never merged into the policy."""
    policy_dir, reward_dir = save_policy_and_lora_reward(policy_model(), tmp_path)
    runs = []
    for share in (True, False):
        policy = PaLM.from_pretrained(policy_dir)
        model, _ = load_reward_model(reward_dir, policy, policy_dir, share)
        assert (model.trunk is policy) == share
        trainer = GRPOTrainer(
            policy, TOK, PROMPTS, reward_model=model, config=config(), show_progress=False
        )
        runs.append(trainer.train(2))
        if share:
            assert sorted(policy.lora_configs) == ["actor", "reward"]
    assert_same_run(*runs, keys=("score_mean", "policy_loss", "kl_ref", "kl_k3"))
