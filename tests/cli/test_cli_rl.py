"""`palm-rlhf grpo` and `palm-rlhf dpo` end to end at toy size, the way a user runs them."""

import json

import pytest
import torch
from conftest import float32_bound

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.arithmetic import addition_problems, write_prompts
from palm_rlhf.cli import main
from palm_rlhf.cli.rl import load_reward_fn, parse_reward_checkpoint
from palm_rlhf.data.prompts import stdlib_prompts
from palm_rlhf.generation import generate
from palm_rlhf.model.reward import RewardConfig, RewardModel
from palm_rlhf.tokenizers.base import encode_prompt
from palm_rlhf.training.runs import read_metrics

TOK = ByteTokenizer()
TINY = dict(num_tokens=TOK.vocab_size, dim=16, depth=1, heads=2, dim_head=8, max_seq_len=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_cli")
    torch.manual_seed(0)
    PaLM(PaLMConfig(**TINY)).save_pretrained(root / "policy")
    RewardModel(PaLM(PaLMConfig(**TINY)), RewardConfig()).save_pretrained(root / "rm")
    write_prompts(root / "problems.jsonl", addition_problems(40, digits=2))
    (root / "my_rewards.py").write_text(
        "def brevity(prompts, responses, **fields):\n    return [-len(r) / 10 for r in responses]\n"
    )
    rows = [
        {"prompt": f"q{i}", "responses": ["aa", "b", "ab"], "ranking": [0, [1, 2]]}
        for i in range(30)
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


GRPO_FLAGS = [
    "--prompts-per-iteration", "4", "--group-size", "4", "--minibatch-size", "8",
    "--max-new-tokens", "4", "--log-samples", "1", "--no-eos-penalty", "nan",
]  # fmt: skip


def test_grpo_command_with_two_functions_and_a_reward_model_then_resume(files, tmp_path, capsys):
    out = tmp_path / "grpo"
    base = [
        "grpo", "--policy", str(files / "policy"), "--prompts", str(files / "problems.jsonl"),
        "--reward-fn", "palm_rlhf.arithmetic:exact_match",
        "--reward-fn", f"{files / 'my_rewards.py'}:brevity:0.5",
        "--reward", f"{files / 'rm'}:0.25", "--out", str(out), *GRPO_FLAGS,
    ]  # fmt: skip
    assert main([*base, "--iterations", "2"]) == 0
    assert "done: iteration 2" in capsys.readouterr().out
    history = read_metrics(out / "grpo_metrics.jsonl")
    assert [m["iteration"] for m in history] == [1, 2]
    for m in history:
        # The score is the weighted sum of the three sources' means.
        expected = (
            m["reward/exact_match"] + 0.5 * m["reward/brevity"] + 0.25 * m["reward/reward_model"]
        )
        # float32 means of float32 scores: equal up to a few roundings of the terms' size
        terms = [
            m["reward/exact_match"],
            m["reward/brevity"],
            m["reward/reward_model"],
        ]
        assert m["score_mean"] == pytest.approx(expected, abs=float32_bound(torch.tensor(terms)))
    assert (out / "grpo_curves.csv").is_file() and (out / "grpo_samples.jsonl").is_file()
    assert "actor" in PaLM.from_pretrained(out / "policy").lora_configs
    # --iterations is a total: --resume runs the third only.
    assert main([*base, "--iterations", "3", "--resume"]) == 0
    assert [m["iteration"] for m in read_metrics(out / "grpo_metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("palm_rlhf.arithmetic", "expected module:function"),
        ("palm_rlhf.arithmetic:nope", "has no function 'nope'"),
        ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
        ("palm_rlhf.arithmetic:exact_match:heavy", "weight 'heavy' is not a number"),
        ("missing_file.py:f", "no such file"),
    ],
)
def test_a_bad_reward_fn_is_refused_before_anything_is_written(
    files, tmp_path, capsys, spec, message
):
    out = tmp_path / "never"
    argv = [
        "grpo", "--policy", str(files / "policy"), "--prompts", str(files / "problems.jsonl"),
        "--reward-fn", spec, "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_grpo_needs_a_reward(files, tmp_path, capsys):
    argv = ["grpo", "--policy", str(files / "policy"), "--prompts", str(files / "problems.jsonl"),
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    assert "--reward-fn or a --reward" in capsys.readouterr().err


def test_reward_specs_parse():
    name, fn, weight = load_reward_fn("palm_rlhf.arithmetic:exact_match:2.5")
    assert name == "exact_match" and weight == 2.5
    assert fn(["1+1="], ["2"], answer=["2"]) == [1.0]
    assert parse_reward_checkpoint("runs/rm:0.5") == (parse_reward_checkpoint("runs/rm")[0], 0.5)
    assert parse_reward_checkpoint("runs/rm")[1] == 1.0


def test_dpo_command_trains_a_policy_other_stages_can_read(files, tmp_path, capsys):
    out = tmp_path / "dpo"
    argv = [
        "dpo", "--data", str(files / "prefs.jsonl"), "--init", str(files / "policy"),
        "--out", str(out), "--steps", "4", "--batch-size", "2", "--seq-len", "16",
        "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "2", "--warmup-steps", "1",
        "--loss-type", "plackett_luce", "--beta", "0.2",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "done:" in capsys.readouterr().out
    history = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in history] == [2, 4]
    assert "eval_reward_accuracy" in history[-1]
    saved = json.loads((out / "dpo_config.json").read_text())
    assert saved["loss_type"] == "plackett_luce" and saved["beta"] == 0.2
    # The run directory is a policy the other stages read, with its "dpo" adapter.
    assert main(["generate", "--checkpoint", str(out), "--prompt", "q1", "--lora-scope", "dpo",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    # A second fresh run into the same directory is refused; --resume continues it.
    assert main(argv) == 2
    assert main([*argv, "--resume", "--steps", "6"]) == 0
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [2, 4, 6]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward-fn", "palm_rlhf.arithmetic:exact_match"], "distinct names"),
        (["--reward", "RM:nan"], "weight must be finite"),
    ],
)
def test_grpo_refuses_before_touching_the_run_directory(files, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    extra = [e.replace("RM", str(files / "rm")) for e in extra]
    argv = [
        "grpo", "--policy", str(files / "policy"), "--prompts", str(files / "problems.jsonl"),
        "--reward-fn", "palm_rlhf.arithmetic:exact_match", "--out", str(out), *extra,
    ]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


LETTERS = "etaoin "


def common_letters(prompts, responses, **fields):
    """Share of the commonest English letters and spaces: a reward a young model can raise."""
    return [sum(c in LETTERS for c in r) / max(1, len(r)) for r in responses]


@torch.no_grad()
def sampled_rewards(policy: PaLM, prompts: list[str], scope: str | None) -> torch.Tensor:
    """common_letters of 4 sampled responses per prompt, with a fixed sampling seed."""
    rows = [encode_prompt(TOK, p) for p in prompts for _ in range(4)]
    generator = torch.Generator().manual_seed(123)
    out = generate(policy, rows, 24, temperature=1.0, eos_id=TOK.eos_id, pad_id=TOK.pad_id,
                   generator=generator, lora_scope=scope)  # fmt: skip
    text = [TOK.decode(t[m & (t != TOK.eos_id)]) for t, m in zip(out.tokens, out.mask, strict=True)]
    return torch.tensor(common_letters(None, text))


def test_default_grpo_raises_the_users_reward_on_held_out_prompts(tmp_path, capsys):
    # The default run a new user makes: a tiny preset model, briefly pretrained, then
    # `palm-rlhf grpo` with nothing but its reward function. The old default (no_eos_penalty
    # -1) replaced the score of every response that did not end, nearly all of them here, so
    # the groups carried no signal from the reward and the policy learned to stop instead.
    (tmp_path / "letters.py").write_text(
        f"LETTERS = {LETTERS!r}\n\n"
        "def common_letters(prompts, responses):\n"
        "    return [sum(c in LETTERS for c in r) / max(1, len(r)) for r in responses]\n"
    )
    train, heldout = stdlib_prompts(64, "train", seed=0), stdlib_prompts(32, "heldout", seed=0)
    rows = "".join(json.dumps({"prompt": p}) + "\n" for p in train)
    (tmp_path / "prompts.jsonl").write_text(rows)
    pretrain = ["pretrain", "--preset", "tiny", "--out", str(tmp_path / "lm"), "--steps", "40",
                "--batch-size", "8", "--seq-len", "128", "--eval-every", "0",
                "--sample-every", "0", "--log-every", "40"]  # fmt: skip
    assert main(pretrain) == 0
    # Only sizes differ from the defaults (a CI-sized batch and response length). Measured: the
    # held-out reward rose 0.457 -> 0.557 in 10 iterations (5.8 standard errors); with
    # --no-eos-penalty -1 it moved 0.457 -> 0.468 (0.7).
    grpo = ["grpo", "--policy", str(tmp_path / "lm"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--reward-fn", f"{tmp_path / 'letters.py'}:common_letters", "--iterations", "12",
            "--prompts-per-iteration", "4", "--max-new-tokens", "24",
            "--out", str(tmp_path / "grpo")]  # fmt: skip
    assert main(grpo) == 0
    history = read_metrics(tmp_path / "grpo" / "grpo_metrics.jsonl")
    assert max(m["eos_rate"] for m in history) < 0.5  # the case the old default broke
    assert all(m["score_shaped_share"] == 0 for m in history)
    before = sampled_rewards(PaLM.from_pretrained(tmp_path / "lm").eval(), heldout, None)
    after = sampled_rewards(PaLM.from_pretrained(tmp_path / "grpo" / "policy").eval(), heldout,
                            "actor")  # fmt: skip
    error = (before.var() / len(before) + after.var() / len(after)).sqrt()
    gain = after.mean() - before.mean()
    assert gain > 4 * error, (before.mean().item(), after.mean().item(), error.item())
