"""train_dpo: offline DPO from the preference JSONL the reward loop reads."""

import json
import math
import random
import shutil

import pytest
import torch
from conftest import assert_close_f32, assert_same_run, count_checkpointed_blocks, float32_bound

from palm_rlhf import ByteTokenizer, LoRAConfig, PaLM, PaLMConfig
from palm_rlhf.data.preferences import PreferenceGroup, load_preferences
from palm_rlhf.data.sft import sft_example
from palm_rlhf.training.config import DPOConfig, TrainConfig
from palm_rlhf.training.dpo import (
    encode_policy_rows,
    reference_logprobs,
    response_logprobs,
    train_dpo,
)
from palm_rlhf.training.runs import read_metrics

TOK = ByteTokenizer()


def write_rankings(path, count: int = 160, k: int = 3, seed: int = 0):
    """Prompts with k responses of a's and b's; more a's is better (ties share a rank)."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(count):
            responses = ["".join(rng.choice("ab") for _ in range(6)) for _ in range(k)]
            counts = [r.count("a") for r in responses]
            if len(set(counts)) < 2:
                continue
            # Best first; responses with as many a's are tied in one tier.
            tiers = [[j for j in range(k) if counts[j] == c] for c in sorted(set(counts))[::-1]]
            record = {"prompt": f"q{i}:", "responses": responses, "ranking": tiers}
            handle.write(json.dumps(record))
            handle.write("\n")
    return path


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    model = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    path = tmp_path_factory.mktemp("init") / "ckpt"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rankings(tmp_path_factory.mktemp("prefs") / "prefs.jsonl")


def config(data, **overrides) -> TrainConfig:
    values = dict(
        seq_len=24,
        batch_size=4,
        steps=40,
        lr=1e-2,
        warmup_steps=2,
        eval_every=40,
        log_every=5,
        checkpoint_every=20,
        weight_decay=0.0,
        seed=0,
    )
    return TrainConfig(**{**values, **overrides})


def test_policy_rows_are_the_sft_rows():
    # Hand-off: DPO scores a response on exactly the row SFT trains on.
    group = PreferenceGroup("def f(x):\n", ["    return x\n", "  pass"], [0, 1])
    batch = encode_policy_rows([group], TOK, 20)
    for row, response in enumerate(group.responses):
        tokens, loss_mask = sft_example(TOK, TOK.encode(group.prompt), TOK.encode(response), 20)
        n = len(tokens)
        assert batch["tokens"][row, :n].tolist() == tokens
        assert batch["loss_mask"][row, :n].tolist() == loss_mask
        assert not batch["mask"][row, n:].any() and not batch["loss_mask"][row, n:].any()
    assert batch["ranks"].tolist() == [0, 1] and batch["group"].tolist() == [0, 0]


def test_response_logprobs_sum_the_response_and_eos_tokens(init):
    model = PaLM.from_pretrained(init).eval()
    group = PreferenceGroup("ab", ["ba", "b"], [0, 1])
    batch = encode_policy_rows([group], TOK, 16)
    got = response_logprobs(model, batch, None)
    tokens = batch["tokens"][0]  # bos a b b a eos
    logp = model(tokens[None]).float().log_softmax(-1)[0]
    expected = sum(logp[t - 1, tokens[t]] for t in (3, 4, 5))  # "b", "a", eos
    torch.testing.assert_close(got[0], expected)


def test_dpo_learns_the_ranking_and_starts_at_log_2(init, data, tmp_path):
    history = train_dpo(init, data, config(data), out_dir=tmp_path / "dpo", show_progress=False)
    # At step 1 the adapter is zero, so policy == reference: every log-ratio is 0 and the
    # sigmoid loss is log 2 (up to batching's float noise in the cached reference).
    first = read_metrics(tmp_path / "dpo" / "metrics.jsonl")[0]
    assert first["step"] == 5
    final = history[-1]
    assert final["eval_reward_accuracy"] > 0.8, final
    assert final["loss"] < math.log(2) - 0.2
    assert final["chosen_reward"] > final["rejected_reward"]
    core = ("step", "loss", "lr", "grad_norm", "tokens_per_s")  # every supervised loop's record
    for key in (*core, "reward_margin", "chosen_logp", "rejected_logp", "eval_reward_margin"):
        assert math.isfinite(final[key]), key
    # The run directory is a policy checkpoint with its "dpo" adapter.
    policy = PaLM.from_pretrained(tmp_path / "dpo")
    assert "dpo" in policy.lora_configs


def reference_noise(record: dict, beta: float = 0.1) -> float:
    """How far from 0 a step-1 implicit reward (beta * (log pi - log pi_ref) with pi == pi_ref)
    may be: the two sums of log-probs come from differently batched forwards, so each rounds at
    its own magnitude (the record's chosen / rejected log-probs); a margin subtracts two."""
    sums = torch.tensor([record["chosen_logp"], record["rejected_logp"]])
    return 2 * beta * float32_bound(sums)


def test_first_step_starts_from_the_reference(init, data, tmp_path):
    # At step 1 the adapter is zero, so policy == reference: every log-ratio is 0 (up to the
    # float noise of batching the cached reference differently), each untied pair's loss is
    # log 2, and the loss is log 2 times the mean share of untied pairs, <= log 2.
    history = train_dpo(
        init, data, config(data, steps=1, log_every=1), out_dir=tmp_path, show_progress=False
    )
    first = history[0]
    for key in ("reward_margin", "chosen_reward", "rejected_reward"):
        assert abs(first[key]) <= reference_noise(first), key
    assert 0.5 * math.log(2) < first["loss"] <= math.log(2) + 1e-6


@pytest.mark.parametrize(
    "dpo_config",
    [
        DPOConfig(loss_type="plackett_luce"),
        DPOConfig(loss_type="ipo", beta=0.5),
        DPOConfig(label_smoothing=0.1),
        DPOConfig(full_finetune=True),
    ],
)
def test_every_objective_learns(init, data, tmp_path, dpo_config):
    history = train_dpo(
        init, data, config(data, steps=30), dpo_config, out_dir=tmp_path, show_progress=False
    )
    assert history[-1]["eval_reward_accuracy"] > 0.75, (dpo_config, history[-1])


def test_reference_runs_only_before_training(init, data, tmp_path, monkeypatch):
    # The reference (adapters off) is computed once per completion and cached: no training
    # step runs a reference forward.
    calls = []
    original = PaLM.forward

    def spy(self, tokens, *args, **kwargs):
        calls.append(kwargs.get("lora_scope"))
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(PaLM, "forward", spy)
    train_dpo(
        init, data, config(data, steps=3, eval_every=0), out_dir=tmp_path, show_progress=False
    )
    # Reference batches (adapters off) first, then the 3 training steps, nothing else.
    first_step = calls.index("dpo")
    assert first_step > 0 and set(calls[:first_step]) == {None}
    assert calls[first_step:] == ["dpo"] * 3


def test_reference_logprobs_do_not_depend_on_batching(init, data):
    model = PaLM.from_pretrained(init)
    groups = load_preferences(data).groups[:6]
    alone = [reference_logprobs(model, [g], TOK, 24, 1)[0] for g in groups]
    batched = reference_logprobs(model, groups, TOK, 24, 4)
    for a, b in zip(alone, batched, strict=True):
        assert_close_f32(a, b)


def test_resume_reproduces_the_uninterrupted_run(init, data, tmp_path):
    run = config(data, steps=10, eval_every=10, checkpoint_every=5, log_every=1, keep_checkpoints=3)
    straight = train_dpo(init, data, run, out_dir=tmp_path / "a", show_progress=False)
    # A run that stopped after its step-5 checkpoint.
    target = tmp_path / "b" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_0000005", target / "step_0000005")
    (target / "latest.json").write_text(json.dumps({"step": 5, "dir": "step_0000005"}))
    resumed = train_dpo(init, data, run, out_dir=tmp_path / "b", resume=True, show_progress=False)
    # Everything but the wall-clock throughput replays exactly.
    timeless = lambda records: [
        {k: v for k, v in r.items() if k != "tokens_per_s"} for r in records
    ]
    assert timeless(resumed) == timeless(straight[5:])
    a = PaLM.from_pretrained(tmp_path / "a").state_dict()
    b = PaLM.from_pretrained(tmp_path / "b").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_dpo_config(init, data, tmp_path):
    train_dpo(
        init, data, config(data, steps=2, checkpoint_every=2), out_dir=tmp_path, show_progress=False
    )
    with pytest.raises(ValueError, match="different DPOConfig"):
        train_dpo(
            init,
            data,
            config(data, steps=4),
            DPOConfig(beta=0.5),
            out_dir=tmp_path,
            resume=True,
            show_progress=False,
        )


def test_bad_settings_are_named(init, data, tmp_path):
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="kto")
    ratings = tmp_path / "ratings.jsonl"
    ratings.write_text(json.dumps({"prompt": "q", "response": "a", "rating": 1}) + "\n")
    with pytest.raises(ValueError, match="no rankings or pairs"):
        train_dpo(init, ratings, config(ratings), out_dir=tmp_path / "r", show_progress=False)


def test_dropout_stays_off_so_training_starts_at_the_reference(tmp_path, data):
    # Bug caught: the policy trained with dropout while the cached reference had none, so the
    # log-ratios were noise, not 0, at step 1.
    torch.manual_seed(0)
    config_ = PaLMConfig(
        num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64,
        dropout=0.5,
    )  # fmt: skip
    PaLM(config_).save_pretrained(tmp_path / "init")
    history = train_dpo(
        tmp_path / "init", data, config(data, steps=1, log_every=1), out_dir=tmp_path / "o",
        show_progress=False,
    )  # fmt: skip
    assert abs(history[0]["reward_margin"]) <= reference_noise(history[0])


def test_dpo_starts_from_the_policy_an_adapter_checkpoint_holds(tmp_path, data):
    # A PPO/GRPO policy carries its "actor" adapter: DPO merges it (the reference is that
    # policy), for LoRA and for full fine-tuning, whose evaluation used to ask for "dpo".
    torch.manual_seed(0)
    start = PaLM(
        PaLMConfig(num_tokens=TOK.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    start.add_lora("actor", LoRAConfig(rank=2, alpha=4))
    with torch.no_grad():
        for name, param in start.named_parameters():
            if ".actor." in name:
                param.normal_(0, 0.3)
    start.save_pretrained(tmp_path / "ppo_policy")
    group = load_preferences(data).groups[:2]
    expected = response_logprobs(start.eval(), encode_policy_rows(group, TOK, 24), "actor")
    for full in (False, True):
        out = tmp_path / f"dpo_{full}"
        run = config(data, steps=2, log_every=1, eval_every=2, checkpoint_every=2)
        history = train_dpo(
            tmp_path / "ppo_policy", data, run, DPOConfig(full_finetune=full), out_dir=out,
            show_progress=False,
        )  # fmt: skip
        assert abs(history[0]["reward_margin"]) <= reference_noise(history[0])
        assert "eval_reward_accuracy" in history[-1]
    reference = reference_logprobs(PaLM.from_pretrained(tmp_path / "dpo_False"), group, TOK, 24, 2)
    assert_close_f32(torch.cat(reference), expected)


def test_a_missing_init_or_bad_data_writes_nothing(tmp_path, init):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train_dpo(tmp_path / "nope", tmp_path / "x.jsonl", config("x"), out_dir=tmp_path / "a")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError):
        train_dpo(init, bad, config(bad), out_dir=tmp_path / "b", show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_activation_checkpointing_trains_the_same_run(init, data, tmp_path, monkeypatch):
    calls = count_checkpointed_blocks(monkeypatch)
    runs = []
    for enabled in (False, True):
        settings = config(data, steps=3, log_every=1, activation_checkpointing=enabled)
        out = tmp_path / f"run{enabled}"
        runs.append(train_dpo(init, data, settings, out_dir=out, show_progress=False))
        assert bool(calls) == enabled
    assert_same_run(*runs, keys=("loss", "grad_norm"))
