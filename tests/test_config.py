"""Config dataclasses: validation names the field, JSON round trip, unknown keys rejected."""

import dataclasses
import json
import math
import re

import pytest

from palm_rlhf.config import (
    LORA_TARGETS,
    LoRAConfig,
    PaLMConfig,
    config_from_dict,
    field_docs,
    load_config,
    save_config,
)
from palm_rlhf.model.reward import RewardConfig
from palm_rlhf.rl.config import GRPOConfig, PPOConfig
from palm_rlhf.training.config import DPOConfig, TrainConfig

BASE = dict(num_tokens=32, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64)
INT_FIELDS = (
    "num_tokens",
    "dim",
    "depth",
    "heads",
    "kv_heads",
    "dim_head",
    "ff_mult",
    "max_seq_len",
)


def config(**overrides) -> PaLMConfig:
    return PaLMConfig(**{**BASE, **overrides})


def every_field_changed() -> list[PaLMConfig]:
    """Configs where every field leaves its default in at least one of them, so a round trip
    that drops a field is caught. Two, because some options exclude each other (the cosine
    and the LayerNorm qk-norm; sliding layers and a bidirectional model)."""
    common = dict(
        num_tokens=33,
        dim=48,
        depth=3,
        heads=6,
        kv_heads=2,
        dim_head=16,
        ff_mult=3,
        max_seq_len=77,
        rotary_base=500.5,
        use_xpos=True,
        xpos_scale_base=256.0,
        qk_norm_scale=7.5,
        dropout=0.25,
        z_loss_weight=1e-4,
        init_std=0.01,
        norm_eps=1e-6,
        logit_scale=0.0625,
    )
    return [
        PaLMConfig(**common, qk_norm=True, causal=False),
        PaLMConfig(
            **common,
            ff_inner=100,
            qk_layernorm=True,
            layer_types=("sliding", "full", "sliding"),
            sliding_window=5,
            rotary_layers=(True, False, True),
        ),
    ]


# ----------------------------------------------------------------------------- round trip


def test_every_field_changed_really_changes_every_field():
    defaults = PaLMConfig(num_tokens=1)
    same = [
        f.name
        for f in dataclasses.fields(PaLMConfig)
        if all(getattr(defaults, f.name) == getattr(c, f.name) for c in every_field_changed())
    ]
    assert same == []


@pytest.mark.parametrize("which", [0, 1])
def test_palm_config_json_round_trip(tmp_path, which):
    original = every_field_changed()[which]
    path = tmp_path / "config.json"
    save_config(original, path)
    on_disk = json.loads(path.read_text())
    assert sorted(on_disk) == sorted(f.name for f in dataclasses.fields(PaLMConfig))
    loaded = load_config(PaLMConfig, path)
    assert loaded == original
    assert type(loaded.rotary_base) is float and type(loaded.use_xpos) is bool
    assert type(loaded.layer_types) is tuple and type(loaded.rotary_layers) is tuple


@pytest.mark.parametrize("which", [0, 1])
def test_palm_config_dict_round_trip(which):
    original = every_field_changed()[which]
    assert PaLMConfig.from_dict(original.to_dict()) == original
    assert PaLMConfig.from_dict(json.loads(json.dumps(original.to_dict()))) == original


def test_lora_config_json_round_trip(tmp_path):
    original = LoRAConfig(rank=3, alpha=5.0, targets=("attn_out", "ff_out"))
    path = tmp_path / "lora.json"
    save_config(original, path)
    assert json.loads(path.read_text())["targets"] == ["attn_out", "ff_out"]
    loaded = load_config(LoRAConfig, path)
    assert loaded == original
    assert loaded.targets == ("attn_out", "ff_out")  # a JSON list comes back as a tuple


def test_lora_targets_list_is_stored_as_tuple():
    assert LoRAConfig(targets=["ff_out"]).targets == ("ff_out",)
    assert LoRAConfig().targets == LORA_TARGETS


def test_ff_inner_dim_is_dim_times_ff_mult():
    assert config(dim=32, ff_mult=3).ff_inner_dim == 96


def test_explicit_ff_inner_overrides_ff_mult():
    assert config(dim=32, ff_mult=3, ff_inner=70).ff_inner_dim == 70


def test_layer_lookups_default_to_full_attention_with_rotary():
    plain = config(depth=3)
    assert [plain.layer_type(i) for i in range(3)] == ["full"] * 3
    assert [plain.layer_has_rotary(i) for i in range(3)] == [True] * 3
    mixed = config(
        depth=3,
        layer_types=["sliding", "full", "sliding"],
        sliding_window=4,
        rotary_layers=[True, False, True],
    )
    assert [mixed.layer_type(i) for i in range(3)] == ["sliding", "full", "sliding"]
    assert [mixed.layer_has_rotary(i) for i in range(3)] == [True, False, True]


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        ({"ff_inner": 0}, "ff_inner", "positive int"),
        ({"qk_norm": True, "qk_layernorm": True}, "qk_layernorm", "excludes qk_norm"),
        ({"norm_eps": 0.0}, "norm_eps", "positive"),
        ({"logit_scale": -1.0}, "logit_scale", "positive"),
        ({"layer_types": ("full",)}, "layer_types", "one entry per layer (depth=2)"),
        ({"layer_types": ("full", "local")}, "layer_types", "'local'"),
        ({"rotary_layers": (True,)}, "rotary_layers", "one entry per layer"),
        ({"rotary_layers": (True, 1)}, "rotary_layers", "true or false"),
        ({"layer_types": ("sliding", "full")}, "sliding_window", "required by 'sliding'"),
        ({"sliding_window": 4}, "sliding_window", "only allowed with them"),
        (
            {"layer_types": ("sliding", "full"), "sliding_window": 4, "causal": False},
            "layer_types",
            "need causal=True",
        ),
        (
            {"layer_types": ("sliding", "full"), "sliding_window": 0},
            "sliding_window",
            "positive int",
        ),
    ],
)
def test_cohere_options_are_validated(overrides, field, message):
    with pytest.raises(ValueError, match=rf"^{field}:.*{re.escape(message)}"):
        config(**overrides)


# ----------------------------------------------------------------------------- unknown keys


def test_config_from_dict_rejects_unknown_key_by_name():
    with pytest.raises(ValueError, match=r"unknown keys \['dimm'\]"):
        config_from_dict(PaLMConfig, {**BASE, "dimm": 64})


def test_lora_config_from_dict_rejects_unknown_key_by_name():
    with pytest.raises(ValueError, match=r"unknown keys \['ranks'\]"):
        config_from_dict(LoRAConfig, {"ranks": 4})


def test_load_config_rejects_unknown_key_naming_key_and_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "hedas": 4}))
    with pytest.raises(ValueError) as info:
        load_config(PaLMConfig, path)
    assert "hedas" in str(info.value)
    assert str(path) in str(info.value)


def test_config_from_dict_rejects_non_object():
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        config_from_dict(PaLMConfig, [1, 2])


def test_load_config_missing_required_field_is_value_error_naming_path(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"dim": 32}))
    with pytest.raises(ValueError) as info:
        load_config(PaLMConfig, path)
    assert str(path) in str(info.value) and "num_tokens" in str(info.value)


def test_load_config_invalid_json_names_path(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"num_tokens": 32,')
    with pytest.raises(ValueError) as info:
        load_config(PaLMConfig, path)
    assert str(info.value).startswith(f"{path}: not valid JSON")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_int_rejected_naming_field(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: must be positive, got {value}$"):
        config(**{name: value})


@pytest.mark.parametrize("name", INT_FIELDS)
def test_bool_passed_as_int_rejected_naming_field(name):
    with pytest.raises(ValueError, match=rf"^{name}: must be an int, got True$"):
        config(**{name: True})


@pytest.mark.parametrize("name", INT_FIELDS)
def test_float_passed_as_int_rejected_naming_field(name):
    with pytest.raises(ValueError, match=rf"^{name}: must be an int"):
        config(**{name: 4.0})


@pytest.mark.parametrize("heads, kv_heads", [(4, 3), (6, 4), (4, 8)])
def test_kv_heads_must_divide_heads(heads, kv_heads):
    with pytest.raises(ValueError, match=rf"^kv_heads: must divide heads={heads}"):
        config(heads=heads, kv_heads=kv_heads)


@pytest.mark.parametrize("heads, kv_heads", [(4, 1), (4, 2), (4, 4), (6, 3)])
def test_kv_heads_dividing_heads_accepted(heads, kv_heads):
    assert config(heads=heads, kv_heads=kv_heads).kv_heads == kv_heads


@pytest.mark.parametrize("dim_head", [7, 9, 1])
def test_odd_dim_head_rejected(dim_head):
    with pytest.raises(ValueError, match=rf"^dim_head: must be even for rotary, got {dim_head}$"):
        config(dim_head=dim_head)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, math.nan])
def test_dropout_out_of_range_rejected(dropout):
    with pytest.raises(ValueError, match=r"^dropout: must be in \[0, 1\)"):
        config(dropout=dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.5, 0.999])
def test_dropout_in_range_accepted(dropout):
    assert config(dropout=dropout).dropout == dropout


@pytest.mark.parametrize(
    "name, value",
    [
        ("rotary_base", 0.0),
        ("rotary_base", -1.0),
        ("xpos_scale_base", 0.0),
        ("z_loss_weight", -1e-4),
        ("init_std", 0.0),
        ("qk_norm_scale", -2.0),
        ("rotary_base", math.nan),
    ],
)
def test_bad_float_rejected_naming_field(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        config(**{name: value})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-2), "rank"),
        (dict(rank=2.0), "rank"),
        (dict(alpha=0.0), "alpha"),
        (dict(targets=()), "targets"),
        (dict(targets=("attn_out", "qkv")), "targets"),
    ],
)
def test_lora_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        LoRAConfig(**kwargs)


def test_lora_unknown_target_is_named():
    with pytest.raises(ValueError, match=r"unknown projections \['qkv'\]"):
        LoRAConfig(targets=("qkv",))


def test_lora_rank_bool_rejected():
    try:
        LoRAConfig(rank=True)
    except ValueError as error:
        assert str(error).startswith("rank: ")
    else:
        raise AssertionError("LoRAConfig(rank=True) was accepted")


# ----------------------------------------------------------------------------- frozen, docs


def test_palm_config_is_frozen():
    cfg = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 64
    assert cfg.dim == 32


def test_lora_config_is_frozen():
    cfg = LoRAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 2
    assert cfg.rank == 8


@pytest.mark.parametrize("cls", [PaLMConfig, LoRAConfig])
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert sorted(docs) == sorted(names)
    for name in names:
        assert docs[name].strip(), name
        assert "\n" not in docs[name] and "  " not in docs[name], name  # whitespace folded


def test_field_docs_text_is_the_literal_under_the_field():
    assert field_docs(PaLMConfig)["dim"] == "Model width (residual stream size)."
    assert field_docs(LoRAConfig)["targets"] == (
        "Projections that get an adapter: fused_proj (q, k, v and the SwiGLU inputs), "
        "attn_out, ff_out."
    )


@pytest.mark.parametrize(
    ("cls", "field", "value", "message"),
    [
        (TrainConfig, "steps", True, "must be an int, got True"),
        (TrainConfig, "steps", 0, "must be positive, got 0"),
        (TrainConfig, "seed", -1, "must be >= 0, got -1"),
        (TrainConfig, "mixed_precision", "fp16", "must be one of no, bf16, got 'fp16'"),
        (DPOConfig, "loss_type", "hinge", "must be one of"),
        (PPOConfig, "kl_target", float("inf"), "must be positive, got inf"),
        (PPOConfig, "entropy_coef", float("nan"), "must be >= 0, got nan"),
        (GRPOConfig, "scale_rewards", "all", "must be one of group, batch, none, got 'all'"),
        (GRPOConfig, "group_size", 2.0, "must be an int, got 2.0"),
        (RewardConfig, "rating_bins", -2, "must be >= 0, got -2"),
        (RewardConfig, "pairwise_margin", float("nan"), "must be >= 0, got nan"),
    ],
)
def test_every_config_validates_with_the_same_helpers(cls, field, value, message):
    """The int / number / choice checks are written once (config.py) and name the field; a bool
    is not an int, and nan or inf is not a positive (or non-negative) number."""
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}: {message}")):
        cls(**{field: value})
