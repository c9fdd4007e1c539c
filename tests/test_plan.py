"""`palm-rlhf plan`: the memory of one step from config.json alone, on fake tensors. The
accounting is exact on known allocations (a view of a weight is no new memory, a freed tensor
is given back), the categories add up to the peak, and the plan moves the way the stage's
settings move it. Its error against measured peaks is in benchmarks/bench_memory.py."""

import json
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.cli import main
from palm_rlhf.plan import CATEGORIES, GATHERED, LiveBytes, PlanSettings, parse_size, plan_memory

CONFIG = PaLMConfig(num_tokens=4096, dim=64, depth=4, heads=4, kv_heads=1, dim_head=16,
                    max_seq_len=512)  # fmt: skip


def test_live_bytes_counts_allocations_views_and_frees_exactly():
    with FakeTensorMode():
        weight = torch.zeros(1000, 1000)  # 4 MB, resident before
        with LiveBytes([weight], lambda: 0) as live:
            transposed = weight.t()  # a view: no new bytes
            assert live.current == 4_000_000
            first = torch.ones(500, 1000)  # +2 MB
            second = first * 2  # +2 MB
            del first  # -2 MB
            third = second.exp()  # +2 MB
            assert live.current == 8_000_000
            del second, third, transposed
            assert live.current == 4_000_000
        assert live.peak == 8_000_000  # weight + first + second; third came after first's free


@pytest.mark.parametrize("stage", ["sft", "sft-lora", "reward", "dpo", "grpo", "ppo"])
def test_every_stage_plans_and_its_categories_add_up(stage):
    rank = 0 if stage == "sft" else 4  # sft: a full fine-tune; sft-lora: a LoRA SFT
    stage = stage.removesuffix("-lora")
    plan = plan_memory(
        CONFIG, PlanSettings(stage, lora_rank=rank, rollout_rows=8, minibatch_size=4)
    )
    assert plan.peak_bytes == sum(plan.categories[c] for c in CATEGORIES)
    assert plan.peak_bytes == max(plan.phases.values())
    weights = sum(p.numel() * 4 for p in PaLM(CONFIG).parameters())
    if rank == 0:  # float32 master weights + two AdamW moments
        assert plan.categories["trainable weights + optimizer state"] >= 3 * weights
        assert plan.categories["frozen weights"] == 0
    else:  # a LoRA stage: the base is frozen (PPO's frozen reward scope and head too)
        frozen = plan.categories["frozen weights"]
        assert frozen == weights if stage != "ppo" else weights < frozen < 1.1 * weights
        assert plan.categories["trainable weights + optimizer state"] < weights / 4
    if stage in ("grpo", "ppo"):
        assert set(plan.phases) == {"generation", "log-probs and scores", "minibatch update"}


def test_the_plan_moves_with_the_settings():
    def peak(**overrides):
        return plan_memory(CONFIG, PlanSettings("dpo", lora_rank=4, **overrides))

    small, large = peak(batch_size=1, seq_len=256), peak(batch_size=4, seq_len=256)
    assert large.categories["activations"] > 3 * small.categories["activations"]
    bf16 = peak(stored_dtype="bfloat16")
    assert bf16.categories["frozen weights"] * 2 == peak().categories["frozen weights"]
    assert (
        peak(base_dtype="float32", stored_dtype="bfloat16").categories["frozen weights"]
        == (peak().categories["frozen weights"])
    )
    deep = PaLMConfig(num_tokens=256, dim=64, depth=12, heads=4, dim_head=16, max_seq_len=512)
    plain = plan_memory(deep, PlanSettings("sft", batch_size=4, seq_len=256))
    checkpointed = plan_memory(
        deep, PlanSettings("sft", batch_size=4, seq_len=256, activation_checkpointing=True)
    )
    assert checkpointed.categories["activations"] < plain.categories["activations"] / 3


def shard_bytes(tensors, processes: int) -> int:
    """FSDP2's dim-0 shards, padded to equal rows: ceil(rows / processes) rows per process."""
    return sum(-(-t.shape[0] // processes) * t[0].numel() * t.element_size() for t in tensors)


def test_fsdp_plans_one_processs_share():
    # A full fine-tune SFT on 4 processes: weights and both AdamW moments (all float32) are
    # split dim-0 four ways; the embedding's unit and two blocks are whole during the pass, and
    # in backward the largest unit's gradient (the embedding's) is copied for its
    # reduce-scatter. (benchmarks/bench_fsdp_memory.py measures the plan's error.)
    settings = dict(batch_size=2, seq_len=128, lora_rank=0)
    single = plan_memory(CONFIG, PlanSettings("sft", **settings))
    sharded = plan_memory(CONFIG, PlanSettings("sft", processes=4, fsdp=True, **settings))
    model = PaLM(CONFIG)
    params = list(model.parameters())
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    root = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("blocks"))
    categories = sharded.categories
    steps = 4 * len(params)  # AdamW's step count per tensor: a float32 scalar, not split
    assert categories["trainable weights + optimizer state"] == 3 * shard_bytes(params, 4) + steps
    assert categories[GATHERED] == root + 2 * block
    assert categories["activations"] == single.categories["activations"]  # the process's own
    assert categories["gradients"] == -(-single.categories["gradients"] // 4) + root
    assert sharded.peak_bytes == sum(categories.values())
    assert sharded.peak_bytes < single.peak_bytes


def test_fsdp_generation_gathers_the_whole_model_once():
    # GRPO decodes with the policy gathered whole (each process to its own rows' eos), so the
    # generation phase holds every weight beside the shards; the update holds two blocks.
    settings = dict(lora_rank=4, rollout_rows=8, minibatch_size=4)
    plan = plan_memory(CONFIG, PlanSettings("grpo", processes=8, fsdp=True, **settings))
    whole = sum(p.numel() * 4 for p in PaLM(CONFIG).parameters())
    assert set(plan.phases) == {"generation", "log-probs and scores", "minibatch update"}
    with_adapters = plan_memory(CONFIG, PlanSettings("grpo", **settings))
    frozen = with_adapters.categories["frozen weights"]
    assert frozen == whole
    # Eight processes: an eighth of the frozen base each (padding aside)
    assert plan.categories["frozen weights"] == shard_bytes(list(PaLM(CONFIG).parameters()), 8)
    if plan.phase == "generation":
        assert plan.categories[GATHERED] > whole  # the base and its adapters, whole


def test_cli_plans_processes_with_fsdp(capsys, tmp_path):
    PaLM(CONFIG).save_pretrained(tmp_path / "model")
    args = ["plan", "sft", str(tmp_path / "model"), "--batch-size", "1", "--seq-len", "64"]
    assert main([*args, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main([*args, "--processes", "4", "--fsdp", "--json"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert sharded["settings"]["processes"] == 4 and sharded["settings"]["fsdp"] is True
    assert sharded["peak_bytes"] < whole["peak_bytes"]
    assert main([*args, "--processes", "4", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "4 processes, sharded with FSDP2" in out and GATHERED in out
    assert main([*args, "--processes", "0"]) == 2
    assert "processes must be >= 1" in capsys.readouterr().err


def test_cli_plans_from_a_published_config_without_weights(capsys, tmp_path):
    r7b = Path(__file__).parent / "hf" / "hub_configs" / "c4ai-command-r7b-12-2024.json"
    small = json.loads(r7b.read_text())
    small.update(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(small))
    args = ["plan", "grpo", str(tmp_path), "--prompts-per-iteration", "2", "--minibatch-size",
            "8", "--device-memory", "24GB", "--json"]  # fmt: skip
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and 0 < plan["peak_bytes"] < 24e9
    assert plan["settings"]["stored_dtype"] == "bfloat16"  # as the file says
    assert plan["settings"]["rollout_rows"] == 16  # 2 prompts x GRPOConfig's group of 8
    # A 1 MB device: the text plan says it does not fit.
    assert main(["plan", "dpo", str(tmp_path), "--lora-rank", "4", "--device-memory", "1MB"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "frozen weights" in out
    assert main(["plan", "sft", str(tmp_path), "--device-memory", "lots"]) == 2
    assert "device memory: 'lots' is not a size" in capsys.readouterr().err


def test_sizes_parse():
    assert parse_size("80GB") == 80_000_000_000
    assert parse_size("24 GiB") == 24 * 2**30
    assert parse_size("512MB") == 512_000_000
    with pytest.raises(ValueError, match="must be positive"):
        parse_size("0GB")


def test_cli_reads_a_checkpoints_stored_dtype_from_its_header(capsys, tmp_path):
    """A palm_rlhf checkpoint says its dtype only in the safetensors header: a bf16 base is
    planned as bf16 (half the frozen bytes), not as float32."""
    PaLM(CONFIG).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert main(["plan", "dpo", str(tmp_path / "bf16"), "--lora-rank", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["stored_dtype"] == "bfloat16"
    weights = sum(p.numel() * 2 for p in PaLM(CONFIG).parameters())
    assert plan["categories_bytes"]["frozen weights"] == weights
