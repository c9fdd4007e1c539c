import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_run, count_checkpointed_blocks, two_process_launch

from palm_rlhf import ByteTokenizer, PaLM
from palm_rlhf.config import PaLMConfig
from palm_rlhf.training.config import TrainConfig
from palm_rlhf.training.lm import train_lm
from palm_rlhf.training.runs import read_metrics
from palm_rlhf.training.state import TrainingCheckpoints
from palm_rlhf.training.step import WindowSchedule, lr_at, param_groups

TOK = ByteTokenizer()
CORE_METRICS = ("step", "loss", "lr", "grad_norm", "tokens_per_s")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_tiny.py"


def tiny_model_config(**overrides) -> PaLMConfig:
    values = dict(num_tokens=TOK.vocab_size, dim=32, depth=2, heads=2, dim_head=16, max_seq_len=64)
    return PaLMConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(8))
        (folder / f"mod{i:02d}.py").write_text(body)
    return folder


def quick_config(**overrides) -> TrainConfig:
    values = dict(
        seq_len=32,
        batch_size=4,
        steps=6,
        lr=3e-3,
        warmup_steps=2,
        eval_every=3,
        eval_batches=2,
        sample_every=0,
        log_every=1,
        checkpoint_every=2,
        seed=0,
    )
    return TrainConfig(**{**values, **overrides})


def test_lr_schedule_hand_computed():
    config = TrainConfig(lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, config) == pytest.approx(1.0)
    assert lr_at(9, config) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_at(14, config) == pytest.approx(0.1)
    assert lr_at(100, config) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_embeddings():
    model = PaLM(tiny_model_config())
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    for name, param in model.named_parameters():
        expected = param.ndim >= 2 and "token_emb" not in name
        assert (id(param) in decayed) == expected, name
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_window_schedule_covers_every_item_each_epoch():
    schedule = WindowSchedule(10, seed=3)
    first, second = schedule.items(0, 10), schedule.items(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert WindowSchedule(10, seed=3).items(7, 6) == schedule.items(7, 6)


def test_pretraining_learns_and_logs(corpus, tmp_path):
    history = train_lm(
        tiny_model_config(),
        quick_config(steps=30, eval_every=15),
        tmp_path / "run",
        show_progress=False,
        data=str(corpus),
    )
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 31))
    # The core record every supervised loop logs (training/step.py; the reward and DPO tests
    # check the same keys), and what the run read, recorded beside its config.
    assert all(set(CORE_METRICS) <= set(m) for m in metrics)
    assert all(m["grad_norm"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    inputs = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert inputs == {"data": str(corpus), "init_checkpoint": None}
    assert "data" not in json.loads((tmp_path / "run" / "train_config.json").read_text())
    evals = [m["eval_bpb"] for m in metrics if "eval_bpb" in m]
    assert len(evals) == 2 and evals[-1] < evals[0] < 8.5
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    # not rounding: a fresh model is near uniform over the vocabulary, up to its random init
    assert history[0]["loss"] == pytest.approx(math.log(TOK.vocab_size), abs=0.3)
    # The final checkpoint is a normal save_pretrained directory.
    latest = TrainingCheckpoints(tmp_path / "run" / "checkpoints").latest()
    assert latest.name == "step_0000030"
    model = PaLM.from_pretrained(latest)
    assert model.config == tiny_model_config()


def test_resume_replays_the_same_losses_bitwise(corpus, tmp_path):
    torch.set_num_threads(1)
    config = quick_config(steps=6, checkpoint_every=3, keep_checkpoints=5)
    full = train_lm(
        tiny_model_config(dropout=0.1),
        config,
        tmp_path / "full",
        show_progress=False,
        data=str(corpus),
    )
    # Interrupted run: the same run directory as it stood after step 3.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step_0000003", resumed_dir / "step_0000003"
    )
    (resumed_dir / "latest.json").write_text(json.dumps({"step": 3, "dir": "step_0000003"}))
    resumed = train_lm(
        tiny_model_config(dropout=0.1),
        config,
        tmp_path / "resumed",
        resume=True,
        show_progress=False,
        data=str(corpus),
    )
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[3:]]
    a = PaLM.from_pretrained(tmp_path / "full" / "checkpoints" / "step_0000006")
    b = PaLM.from_pretrained(tmp_path / "resumed" / "checkpoints" / "step_0000006")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_resume_refuses_a_different_model_config(corpus, tmp_path):
    config = quick_config(steps=2)
    train_lm(tiny_model_config(), config, tmp_path / "run", show_progress=False, data=str(corpus))
    with pytest.raises(ValueError, match="does not match the requested model config"):
        train_lm(
            tiny_model_config(dim=48),
            quick_config(steps=4),
            tmp_path / "run",
            resume=True,
            show_progress=False,
            data=str(corpus),
        )


def test_sigkill_while_checkpointing_keeps_the_previous_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(corpus), str(out), "4", "kill-on-second-save"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    latest = TrainingCheckpoints(out / "checkpoints").latest()
    assert latest.name == "step_0000001"
    PaLM.from_pretrained(latest)  # loads cleanly
    assert not (out / "checkpoints" / "step_0000002").exists()
    # And the run resumes from it.
    history = train_lm(
        tiny_model_config(),
        quick_config(steps=3, warmup_steps=1, seed=1, eval_every=0, checkpoint_every=1, lr=3e-3),
        out,
        resume=True,
        show_progress=False,
        data=str(corpus),
    )
    assert [h["step"] for h in history] == [2, 3]


def test_two_processes_match_one_process_with_the_same_global_batch(corpus, tmp_path):
    launch = two_process_launch()
    two = subprocess.run(
        [*launch, str(SCRIPT), str(corpus), str(tmp_path / "two"), "2", "run"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(SCRIPT), str(corpus), str(tmp_path / "one"), "4", "run"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "one" / "result_rank0.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    # DDP keeps the replicas identical...
    assert ranks[0]["param_first"] == ranks[1]["param_first"]
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    # ...and 2 x 2 sequences per step is the same optimisation as 1 x 4 (up to float
    # summation order in the gradient all-reduce).
    for a, b in zip(ranks[0]["losses"], single["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert ranks[0]["param_sum"] == pytest.approx(single["param_sum"], rel=1e-4)


def test_sft_from_a_pretrained_checkpoint(corpus, tmp_path):
    train_lm(
        tiny_model_config(),
        quick_config(steps=2),
        tmp_path / "base",
        show_progress=False,
        data=str(corpus),
    )
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as handle:
        for i in range(80):
            handle.write(json.dumps({"prompt": f"square {i}?", "response": f" {i * i}"}) + "\n")
    init = TrainingCheckpoints(tmp_path / "base" / "checkpoints").latest()
    history = train_lm(
        tiny_model_config(),
        quick_config(steps=25, eval_every=25),
        tmp_path / "sft",
        init_checkpoint=init,
        sft=True,
        show_progress=False,
        data=str(pairs),
    )
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert 0 < history[-1]["eval_bpb"] < 8.5


def test_bf16_autocast_trains(corpus, tmp_path, fresh_accelerate_state):
    history = train_lm(
        tiny_model_config(),
        quick_config(steps=12, eval_every=12, mixed_precision="bf16"),
        tmp_path / "bf16",
        show_progress=False,
        data=str(corpus),
    )
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    # Weights stay float32 (autocast only changes the compute dtype).
    model = PaLM.from_pretrained(TrainingCheckpoints(tmp_path / "bf16" / "checkpoints").latest())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_run_directory_is_never_clobbered(corpus, tmp_path):
    # Bug caught: a second fresh run into the same --out silently truncated the first run's
    # metrics.jsonl and mixed its checkpoints with the new ones.
    out = tmp_path / "run"
    train_lm(tiny_model_config(), quick_config(steps=2), out, show_progress=False, data=str(corpus))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train_lm(
            tiny_model_config(), quick_config(steps=2), out, show_progress=False, data=str(corpus)
        )
    assert (out / "metrics.jsonl").read_text() == before
    (out / "notes.txt").write_text("mine")
    history = train_lm(
        tiny_model_config(),
        quick_config(steps=1),
        out,
        show_progress=False,
        overwrite=True,
        data=str(corpus),
    )
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl") if "loss" in m] == [1]
    assert [h["step"] for h in history] == [1]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files go
    with pytest.raises(ValueError, match="not both"):
        train_lm(
            tiny_model_config(),
            quick_config(steps=1),
            out,
            resume=True,
            overwrite=True,
            data=str(corpus),
        )


def test_sft_resume_needs_no_repeated_architecture(corpus, tmp_path):
    # Bug caught: with --init, --resume compared the checkpoint against the default preset and
    # refused unless the init model's architecture was repeated by hand.
    train_lm(tiny_model_config(), quick_config(steps=2), tmp_path / "base",
             show_progress=False, data=str(corpus))  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n"
                             for i in range(20)))  # fmt: skip
    init = tmp_path / "base"
    config = quick_config(steps=2, checkpoint_every=2)
    train_lm(
        None,
        config,
        tmp_path / "sft",
        init_checkpoint=init,
        sft=True,
        show_progress=False,
        data=str(pairs),
    )
    longer = quick_config(steps=4, checkpoint_every=2)
    history = train_lm(
        None, longer, tmp_path / "sft", init_checkpoint=init, sft=True, resume=True,
        show_progress=False, data=str(pairs))  # fmt: skip
    assert [h["step"] for h in history if "loss" in h][-1] == 4
    with pytest.raises(ValueError, match="architecture comes from the init checkpoint"):
        train_lm(
            tiny_model_config(dim=64),
            config,
            tmp_path / "x",
            init_checkpoint=init,
            sft=True,
            data=str(pairs),
        )


def test_overwrite_never_deletes_the_runs_own_input(tmp_path):
    from palm_rlhf.training.runs import claim_run_dir

    out = tmp_path / "run"
    (out / "policy").mkdir(parents=True)
    (out / "policy" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds this run's input"):
        claim_run_dir(out, ["policy"], False, True, inputs=[out / "policy"])
    assert (out / "policy" / "config.json").exists()
    claim_run_dir(out, ["policy"], False, True, inputs=[tmp_path / "elsewhere"])
    assert not (out / "policy").exists()


def test_activation_checkpointing_trains_the_same_run(corpus, tmp_path, monkeypatch):
    calls = count_checkpointed_blocks(monkeypatch)
    runs = []
    for enabled in (False, True):
        runs.append(
            train_lm(
                tiny_model_config(),
                quick_config(steps=3, activation_checkpointing=enabled),
                tmp_path / f"run{enabled}",
                show_progress=False,
                data=str(corpus),
            )
        )
        assert bool(calls) == enabled
    assert_same_run(*runs, keys=("loss", "grad_norm"))


def test_lora_sft_trains_a_scope_on_a_frozen_bf16_base(corpus, tmp_path):
    """--lora-rank: the base stays as stored (bf16, bit for bit), the 'sft' scope trains in
    float32 and lowers the loss, resume continues it, and the next stage reads the model the
    checkpoint holds (a reward model's trunk has the scope merged in, not the bare base)."""
    from palm_rlhf.model.reward import RewardModel

    torch.manual_seed(0)
    PaLM(tiny_model_config()).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    config = quick_config(steps=12, lr=1e-2, lora_rank=4, lora_alpha=8.0, checkpoint_every=6)
    history = train_lm(None, config, tmp_path / "sft", init_checkpoint=tmp_path / "base",
                       show_progress=False, data=str(corpus))  # fmt: skip
    assert history[-1]["loss"] < history[0]["loss"] - 0.1
    base = PaLM.from_pretrained(tmp_path / "base")
    tuned = PaLM.from_pretrained(tmp_path / "sft")
    assert sorted(tuned.lora_configs) == ["sft"]
    for name, tensor in base.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tuned.state_dict()[name].view(torch.int16), tensor.view(torch.int16))
    adapters = [p for n, p in tuned.named_parameters() if ".adapters.sft." in n]
    assert adapters and all(p.dtype == torch.float32 and p.abs().sum() > 0 for p in adapters)

    resumed = train_lm(None, config, tmp_path / "sft", resume=True,
                       init_checkpoint=tmp_path / "base", show_progress=False,
                       data=str(corpus))  # fmt: skip
    assert resumed == []  # already at its 12 steps: nothing more, and no error

    reward = RewardModel.from_palm_checkpoint(tmp_path / "sft")
    tokens = torch.randint(0, TOK.vocab_size, (2, 9))
    with torch.no_grad():
        expected = tuned(tokens, lora_scope="sft")
        merged = reward.trunk(tokens)
    torch.testing.assert_close(merged.float(), expected.float(), atol=0.05, rtol=0)
    assert "sft" not in reward.trunk.lora_configs

    with pytest.raises(ValueError, match="lora_rank: a LoRA scope fine-tunes a pretrained"):
        train_lm(tiny_model_config(), quick_config(lora_rank=4), tmp_path / "fresh",
                 show_progress=False, data=str(corpus))  # fmt: skip
    with pytest.raises(ValueError, match="base_dtype: a full fine-tune"):
        full = quick_config(base_dtype="bfloat16")
        train_lm(None, full, tmp_path / "full", init_checkpoint=tmp_path / "base",
                 show_progress=False, data=str(corpus))  # fmt: skip
