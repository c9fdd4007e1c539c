import json
import os
import subprocess
import sys

import pytest
import torch

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig, generate
from palm_rlhf.cli import main
from palm_rlhf.tokenizers.base import encode_prompt
from palm_rlhf.training.runs import read_metrics


def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-p"):
        assert option in help_text


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "palm_rlhf.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "generate" in result.stdout


def greedy_text(checkpoint, prompt: str, new_tokens: int, lora_scope=None) -> str:
    """What the CLI must print for a greedy sample: the prompt, then the model's own greedy
    continuation of [bos] + prompt, computed here through the Python API."""
    tok = ByteTokenizer()
    out = generate(
        PaLM.from_pretrained(checkpoint),
        [encode_prompt(tok, prompt)],
        max_new_tokens=new_tokens,
        temperature=0,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        lora_scope=lora_scope,
    )
    return prompt + tok.decode(out.tokens[0][out.mask[0]])


def test_generate_from_checkpoint(tmp_path, capsys):
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = PaLM(
        PaLMConfig(num_tokens=tok.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    with torch.no_grad():  # sharper logits, so the greedy continuation is not all one byte
        model.token_emb.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "ckpt")
    code = main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--prompt",
            "def ",
            "--prompt",
            "x = ",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ]
    )
    assert code == 0
    blocks = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")
    # Bug caught: a CLI that printed the prompt and anything after it passed the old check.
    assert blocks[0] == greedy_text(tmp_path / "ckpt", "def ", 8)
    assert blocks[1] == greedy_text(tmp_path / "ckpt", "x = ", 8)
    assert blocks[0] != "def "  # something was generated


def test_generate_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "a"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    model = PaLM(PaLMConfig(num_tokens=40, dim=16, depth=1, heads=2, dim_head=8, max_seq_len=32))
    model.save_pretrained(tmp_path / "small")
    assert main(["generate", "--checkpoint", str(tmp_path / "small"), "--prompt", "a"]) == 2
    assert "has 40 token embeddings, but its tokenizer (ByteTokenizer) produces ids up to 258" in (
        capsys.readouterr().err
    )


def test_pretrain_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--preset",
        "--data",
        "--steps",
        "--out",
        "--resume",
        "--seq-len",
        "--grad-accum",
        "--mixed-precision",
        "--dim",
        "--kv-heads",
    ):
        assert option in text
    # Help text comes from the config field docstrings.
    assert "Micro-batches accumulated per optimizer step" in text


def test_pretrain_then_resume_then_generate(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: print({i})\n" for i in range(400)))
    common = [
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "run"),
        "--dim",
        "32",
        "--depth",
        "1",
        "--heads",
        "2",
        "--dim-head",
        "16",
        "--max-seq-len",
        "64",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--sample-every",
        "0",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
        "--cpu",
    ]
    assert main(["pretrain", *common, "--steps", "2"]) == 0
    assert main(["pretrain", *common, "--steps", "4", "--resume"]) == 0  # extend the run
    steps = [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4]
    # A checkpoint whose model config does not match what was asked for is refused.
    changed = [*common[: common.index("--dim") + 1], "48", *common[common.index("--dim") + 2 :]]
    assert main(["pretrain", *changed, "--steps", "6", "--resume"]) == 2
    assert "does not match the requested model config" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path / "run"),
                "--prompt",
                "line ",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    # The run directory stands for its latest checkpoint: the step-4 model, greedy.
    latest = tmp_path / "run" / "checkpoints" / "step_0000004"
    printed = capsys.readouterr().out.split("\n" + "-" * 40)[0]
    assert printed == greedy_text(latest, "line ", 5)
    assert len(printed) > len("line ")


def test_pretrain_bad_input_names_the_problem(tmp_path, capsys):
    out = ["--out", str(tmp_path / "run"), "--cpu"]
    assert main(["pretrain", "--data", str(tmp_path / "missing.txt"), *out]) == 2
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    assert main(["pretrain", "--data", str(tmp_path / "blob.bin"), *out]) == 2
    assert "binary file" in capsys.readouterr().err
    assert main(["pretrain", "--data", "stdlib", "--steps", "0", *out]) == 2
    assert "steps: must be positive, got 0" in capsys.readouterr().err


def test_reward_then_score(tmp_path, capsys):
    torch.manual_seed(0)
    trunk = PaLM(PaLMConfig(num_tokens=259, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64))
    trunk.save_pretrained(tmp_path / "trunk")
    prefs = tmp_path / "prefs.jsonl"
    with open(prefs, "w") as handle:
        for i in range(40):
            handle.write(f'{{"prompt": "p{i}", "chosen": "aaaa", "rejected": "bbbb"}}\n')
    args = [
        "reward",
        "--data",
        str(prefs),
        "--init",
        str(tmp_path / "trunk"),
        "--out",
        str(tmp_path / "rm"),
        "--steps",
        "30",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--eval-every",
        "30",
        "--log-every",
        "10",
        "--lora-rank",
        "4",
        "--cpu",
    ]
    assert main(args) == 0
    assert "eval_accuracy=1" in capsys.readouterr().out
    assert (
        main(
            [
                "score",
                "--checkpoint",
                str(tmp_path / "rm"),
                "--prompt",
                "p1",
                "--response",
                "aaaa",
                "--response",
                "bbbb",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    good, bad = (float(line.split("\t")[0]) for line in lines)
    assert good > bad
    # Missing data and a plain PaLM checkpoint given as a reward model fail clearly.
    assert main(["reward", "--init", str(tmp_path / "trunk"), "--out", str(tmp_path / "x")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert (
        main(["score", "--checkpoint", str(tmp_path / "trunk"), "--prompt", "p", "--response", "a"])
        == 2
    )
    assert "reward_config.json" in capsys.readouterr().err


def test_ppo_stage_runs_alone_and_resumes(tmp_path, capsys):
    from palm_rlhf.model.reward import RewardConfig, RewardModel

    torch.manual_seed(0)
    config = PaLMConfig(num_tokens=259, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    PaLM(config).save_pretrained(tmp_path / "policy")
    RewardModel(PaLM(config), RewardConfig()).save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"def f{i}(x):\n" for i in range(20)))

    def ppo_args(prompt_file, iterations, *extra):
        return [
            "ppo",
            "--policy",
            str(tmp_path / "policy"),
            "--reward",
            str(tmp_path / "rm"),
            "--prompts",
            str(prompt_file),
            "--out",
            str(tmp_path / "ppo"),
            "--iterations",
            str(iterations),
            "--rollout-batch-size",
            "4",
            "--minibatch-size",
            "2",
            "--max-new-tokens",
            "6",
            *extra,
        ]

    metrics = tmp_path / "ppo" / "ppo_metrics.jsonl"

    def iterations():
        return [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]

    assert main(ppo_args(prompts, 2, "--checkpoint-every", "1")) == 0
    assert iterations() == [1, 2]
    # A run killed after logging iteration 3 but before saving it: resuming replays 3 and the
    # stray line goes, so no iteration appears twice. --iterations is a total, like --steps.
    with open(metrics, "a") as handle:
        handle.write(json.dumps({"iteration": 3, "stray": True}) + "\n")
    assert main(ppo_args(prompts, 4, "--resume")) == 0
    assert iterations() == [1, 2, 3, 4] and "stray" not in metrics.read_text()
    assert main(ppo_args(prompts, 4, "--resume")) == 0  # already there: nothing to do
    assert iterations() == [1, 2, 3, 4]
    assert "nothing to do" in capsys.readouterr().out
    # A fresh run into a directory holding a run is refused and touches nothing...
    before = metrics.read_text()
    assert main(ppo_args(prompts, 1)) == 2
    assert "--overwrite" in capsys.readouterr().err and metrics.read_text() == before
    # ...unless asked to start over.
    assert main(ppo_args(prompts, 1, "--overwrite")) == 0
    assert iterations() == [1]
    assert main(ppo_args(prompts, 1, "--overwrite", "--num-prompts", "5")) == 2
    assert "--num-prompts only applies" in capsys.readouterr().err
    assert main(ppo_args(prompts, 2, "--overwrite")) == 0  # the policy generate reads next
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path / "ppo" / "policy"),
                "--prompt",
                "def ",
                "--lora-scope",
                "actor",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert main(ppo_args(tmp_path / "none.txt", 1)) == 2
    assert "no such prompts file" in capsys.readouterr().err


def test_tqdm_disable_silences_the_progress_bars(tmp_path):
    # Bug caught: every bar passed disable=False explicitly, which overrides TQDM_DISABLE.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x = 1\n" * 200)

    def pretrain(out, **env):
        command = [
            sys.executable, "-m", "palm_rlhf.cli", "pretrain", "--data", str(corpus),
            "--out", str(tmp_path / out), "--dim", "16", "--depth", "1", "--heads", "2",
            "--dim-head", "8", "--max-seq-len", "32", "--seq-len", "16", "--batch-size", "2",
            "--steps", "2", "--eval-every", "0", "--sample-every", "0", "--cpu",
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, env={**os.environ, **env}
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    assert "pretrain: 100%" in pretrain("shown")
    assert "pretrain:" not in pretrain("silent", TQDM_DISABLE="1")


def test_a_launcher_precision_the_stage_would_override_is_refused(tmp_path, capsys, monkeypatch):
    # `accelerate launch --mixed_precision bf16` (or a launch config saying bf16) used to be
    # overridden by the stage's --mixed-precision default 'no' without a word: the run went
    # float32 while the launch config said bf16. Now the disagreement stops the run first.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = ["pretrain", "--cpu", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the launcher asks for mixed precision 'bf16', the stage for 'no'" in err
    assert "--mixed-precision bf16" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # agreeing: no complaint
    from palm_rlhf.cli.options import check_launcher_precision

    check_launcher_precision("no")
