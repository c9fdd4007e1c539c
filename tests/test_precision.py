"""Precision in every LoRA stage: a frozen base stays in the dtype its checkpoint stores (a bf16
base comes out of reward, DPO, GRPO and PPO runs bit for bit the same, and is never held in
float32), adapters and heads train in float32 (their gradients too), `base_dtype` overrides the
base's dtype, full fine-tunes keep float32 master weights, and PPO and GRPO run their forward
passes under bf16 autocast when `mixed_precision="bf16"`, like the supervised stages."""

import json
import warnings

import pytest
import torch
from conftest import tiny_model

from palm_rlhf import ByteTokenizer, PaLM
from palm_rlhf.model.reward import RewardConfig, RewardModel
from palm_rlhf.rl.config import GRPOConfig, PPOConfig
from palm_rlhf.rl.grpo import GRPOTrainer
from palm_rlhf.rl.ppo import PPOTrainer
from palm_rlhf.training.config import DPOConfig, TrainConfig
from palm_rlhf.training.dpo import train_dpo
from palm_rlhf.training.reward import train_reward

TOK = ByteTokenizer()
PROMPTS = [f"p{i}:" for i in range(16)]


def even_bytes(prompts, responses, **fields):
    """A reward that differs between almost any two responses of a random model."""
    return [sum(ord(c) % 2 == 0 for c in r) / max(1, len(r)) for r in responses]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "bf16"
    model = tiny_model(num_tokens=TOK.vocab_size, max_seq_len=64).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def preferences(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    rows = [
        {"prompt": f"q{i}:", "chosen": "a" * (4 + i % 5), "rejected": "b" * (3 + i % 4)}
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base's tensors: everything but adapters and heads."""
    return {
        name.removeprefix("trunk."): tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if ".adapters." not in name and "head" not in name and "score_" not in name
    }


def assert_bitwise_bf16(after: dict, before: dict) -> None:
    assert after.keys() == before.keys() and after
    for name, tensor in before.items():
        assert tensor.dtype == torch.bfloat16 and after[name].dtype == torch.bfloat16, name
        assert torch.equal(after[name].view(torch.int16), tensor.view(torch.int16)), name


@pytest.fixture
def gradient_dtypes(monkeypatch):
    """(parameter dtype, gradient dtype) of every parameter an optimizer steps."""
    seen = set()
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        for group in self.param_groups:
            seen.update((p.dtype, p.grad.dtype) for p in group["params"] if p.grad is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def train_config(data, **overrides) -> TrainConfig:
    values = dict(
        seq_len=24,
        batch_size=4,
        steps=2,
        lr=1e-2,
        warmup_steps=1,
        eval_every=2,
        log_every=1,
        checkpoint_every=2,
        weight_decay=0.0,
        seed=0,
    )
    return TrainConfig(**{**values, **overrides})


def test_reward_lora_keeps_a_bf16_base_and_trains_float32(
    bf16_base, preferences, tmp_path, gradient_dtypes
):
    before = base_tensors(PaLM.from_pretrained(bf16_base))
    config = train_config(preferences)
    train_reward(
        bf16_base,
        preferences,
        config,
        RewardConfig(lora_rank=4),
        out_dir=tmp_path / "rm",
        show_progress=False,
    )
    model = RewardModel.from_pretrained(tmp_path / "rm")
    assert_bitwise_bf16(base_tensors(model), before)
    trained = model.trainable_parameters()
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert gradient_dtypes == {(torch.float32, torch.float32)}


def test_dpo_lora_keeps_a_bf16_base_and_trains_float32(
    bf16_base, preferences, tmp_path, gradient_dtypes
):
    before = base_tensors(PaLM.from_pretrained(bf16_base))
    train_dpo(
        bf16_base,
        preferences,
        train_config(preferences),
        DPOConfig(lora_rank=4),
        out_dir=tmp_path / "dpo",
        show_progress=False,
    )
    policy = PaLM.from_pretrained(tmp_path / "dpo")
    assert_bitwise_bf16(base_tensors(policy), before)
    adapters = [p for n, p in policy.named_parameters() if ".adapters." in n]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert gradient_dtypes == {(torch.float32, torch.float32)}


def grpo_config(**overrides) -> GRPOConfig:
    values = dict(
        prompts_per_iteration=2,
        group_size=4,
        minibatch_size=8,
        max_new_tokens=6,
        lr=1e-2,
        no_eos_penalty=float("nan"),
        seed=0,
    )
    return GRPOConfig(**{**values, **overrides})


def test_grpo_lora_keeps_a_bf16_base_and_trains_float32(bf16_base, gradient_dtypes):
    policy = PaLM.from_pretrained(bf16_base)
    before = base_tensors(policy)
    trainer = GRPOTrainer(
        policy, TOK, PROMPTS, reward_fns=[even_bytes], config=grpo_config(), show_progress=False
    )
    history = trainer.train(2)
    assert history[-1]["kl_ref"] > 0  # the adapter moved the policy away from the base
    assert_bitwise_bf16(base_tensors(trainer.policy), before)
    assert all(p.dtype == torch.float32 for p in trainer.actor_params)
    assert gradient_dtypes == {(torch.float32, torch.float32)}


def test_ppo_keeps_bf16_bases_for_policy_critic_and_reward(bf16_base, gradient_dtypes):
    policy = PaLM.from_pretrained(bf16_base)
    reward = RewardModel(PaLM.from_pretrained(bf16_base), RewardConfig(lora_rank=4))
    policy_before, reward_before = base_tensors(policy), base_tensors(reward)
    config = PPOConfig(
        rollout_batch_size=4,
        minibatch_size=4,
        max_new_tokens=6,
        ppo_epochs=1,
        no_eos_penalty=float("nan"),
    )
    trainer = PPOTrainer(
        policy, TOK, PROMPTS, reward_model=reward, config=config, show_progress=False
    )
    trainer.train(1)
    assert_bitwise_bf16(base_tensors(trainer.policy), policy_before)
    assert_bitwise_bf16(base_tensors(reward), reward_before)
    assert trainer.critic.head.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.critic_params + trainer.actor_params)
    assert gradient_dtypes == {(torch.float32, torch.float32)}


def test_base_dtype_overrides_the_stored_dtype_and_full_finetunes_train_float32(bf16_base):
    # --base-dtype float32: a bf16 checkpoint's base upcast (CPUs without bf16 instructions)
    trainer = GRPOTrainer(
        PaLM.from_pretrained(bf16_base),
        TOK,
        PROMPTS,
        reward_fns=[even_bytes],
        config=grpo_config(base_dtype="float32"),
        show_progress=False,
    )
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    # a float32 base kept in bf16 beside float32 adapters
    trainer = GRPOTrainer(
        tiny_model(num_tokens=TOK.vocab_size),
        TOK,
        PROMPTS,
        reward_fns=[even_bytes],
        config=grpo_config(base_dtype="bfloat16"),
        show_progress=False,
    )
    trained = {id(p) for p in trainer.actor_params}
    for name, param in trainer.policy.named_parameters():
        assert param.dtype == (torch.float32 if id(param) in trained else torch.bfloat16), name
    # a full fine-tune: float32 master weights, the frozen reference as stored
    trainer = GRPOTrainer(
        PaLM.from_pretrained(bf16_base),
        TOK,
        PROMPTS,
        reward_fns=[even_bytes],
        config=grpo_config(full_finetune=True),
        show_progress=False,
    )
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="base_dtype: a full fine-tune trains every weight"):
        GRPOTrainer(
            PaLM.from_pretrained(bf16_base),
            TOK,
            PROMPTS,
            reward_fns=[even_bytes],
            config=grpo_config(full_finetune=True, base_dtype="bfloat16"),
        )


@pytest.fixture
def autocast_states(monkeypatch):
    """Whether CPU autocast was on in each forward pass of any PaLM (every pass, through
    forward or forward_hidden, runs the trunk's body `_hidden`)."""
    states = []
    original = PaLM._hidden

    def hidden(self, *args, **kwargs):
        states.append(torch.is_autocast_enabled("cpu"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PaLM, "_hidden", hidden)
    return states


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_online_stages_honour_mixed_precision(stage, autocast_states, fresh_accelerate_state):
    """Sampling, scoring, old/reference/current log-probs and the critic all run under bf16
    autocast with mixed_precision="bf16", and none does without it."""
    from accelerate import Accelerator

    def run(precision):
        autocast_states.clear()
        if stage == "grpo":
            config = grpo_config(mixed_precision=precision, kl_coef=0.04)
            trainer = GRPOTrainer(
                tiny_model(num_tokens=TOK.vocab_size),
                TOK,
                PROMPTS,
                reward_fns=[even_bytes],
                config=config,
                show_progress=False,
            )
        else:
            config = PPOConfig(
                rollout_batch_size=4,
                minibatch_size=4,
                max_new_tokens=6,
                ppo_epochs=1,
                mixed_precision=precision,
            )
            trainer = PPOTrainer(
                tiny_model(num_tokens=TOK.vocab_size),
                TOK,
                PROMPTS,
                reward_fn=even_bytes,
                config=config,
                show_progress=False,
            )
        history = trainer.train(1)
        assert torch.isfinite(torch.tensor(history[-1]["policy_loss"]))
        # Scores summed in bf16 are not counted as shaped (nothing shapes them here).
        assert history[-1]["score_shaped_share"] == 0
        return set(autocast_states), len(autocast_states)

    states, calls = run("bf16")
    assert states == {True} and calls > 4
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert run("no")[0] == {False}
    with pytest.raises(ValueError, match="mixed_precision: the config asks for 'bf16'"):
        GRPOTrainer(
            tiny_model(num_tokens=TOK.vocab_size),
            TOK,
            PROMPTS,
            reward_fns=[even_bytes],
            config=grpo_config(mixed_precision="bf16"),
            accelerator=Accelerator(),
        )


def test_a_float16_base_under_bf16_autocast_is_named_and_priced():
    # Found planning Aya Expanse 32B (an fp16 file): bf16 autocast casts every fp16 weight in
    # each training pass and keeps the copy for backward, doubling the base during training.
    # The stages warn and the plan shows the cost; --base-dtype bfloat16 removes it.
    from palm_rlhf import PaLMConfig
    from palm_rlhf.plan import PlanSettings, plan_memory
    from palm_rlhf.training.step import AUTOCAST_COPIES, set_training_dtypes

    model = tiny_model(num_tokens=TOK.vocab_size).to(torch.float16)
    adapter = model.add_lora("actor")
    with pytest.warns(UserWarning, match="--base-dtype bfloat16 converts the base once"):
        set_training_dtypes(model, adapter, "stored", "bf16")
    assert "float16" in AUTOCAST_COPIES
    for dtype, precision in (("bfloat16", "bf16"), ("stored", "no")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: nothing is cast per pass
            set_training_dtypes(tiny_model().to(torch.float16), [], dtype, precision)
    config = PaLMConfig(num_tokens=512, dim=256, depth=2, heads=4, kv_heads=1, dim_head=64)
    settings = dict(stored_dtype="float16", mixed_precision="bf16", lora_rank=4, seq_len=256)
    stored = plan_memory(config, PlanSettings("dpo", **settings))
    converted = plan_memory(config, PlanSettings("dpo", base_dtype="bfloat16", **settings))
    weights = stored.categories["frozen weights"]
    assert weights == converted.categories["frozen weights"]  # the same 2 bytes per weight
    # the casts kept for backward: at least one more copy of the blocks' weights (and the
    # residual stream promoted to float32 where fp16 meets bf16)
    blocks = sum(p.numel() * 2 for p in PaLM(config).blocks.parameters())
    extra = stored.categories["activations"] - converted.categories["activations"]
    assert extra >= blocks
