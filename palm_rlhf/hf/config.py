"""Hugging Face `config.json` <-> `PaLMConfig` for the Cohere and Cohere2 families.

Every key of a Cohere config is either mapped, checked against the one value we can express
(`REQUIRED_VALUES`), checked against the layer pattern it restates (`PATTERN_KEYS`), or known to
leave the model's function unchanged (`IGNORED_KEYS`, `PARALLELISM_KEYS`); any other key is
refused by name. The files the hub publishes (Command R v01 to Command A, Aya, tiny-aya) all
import: tests/hf/test_hub_configs.py. A key we do not understand might change the model, and a
silently wrong model is the one outcome a conversion must never have.
"""

from __future__ import annotations

from typing import Any

from ..config import PaLMConfig

ARCHITECTURES = {"cohere": "CohereForCausalLM", "cohere2": "Cohere2ForCausalLM"}

# Keys that change nothing the forward pass computes: bookkeeping, generation defaults (our
# stages take theirs from flags), the token ids (the tokenizer's files say them), training-only
# settings (attention dropout: RLHF runs without dropout) and the initialiser's scale.
IGNORED_KEYS = frozenset(
    {
        "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
        "return_dict", "output_attentions", "output_hidden_states", "torchscript",
        "use_bfloat16", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
        "add_cross_attention", "tie_encoder_decoder", "id2label", "label2id", "problem_type",
        "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "pruned_heads",
        "tf_legacy_loss", "cross_attention_hidden_size", "_attn_implementation_autoset",
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
        "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
        "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
        "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
        "output_scores", "return_dict_in_generate", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "attention_dropout", "initializer_range", "cache_implementation", "model_max_length",
    }
)  # fmt: skip

# How Cohere's own training code split the model across devices; transformers reads neither,
# and both values of use_parallel_embedding appear in published files of the same architecture
# (Command R7B true, tiny-aya false). pretraining_tp (Command R v01) slices the same matrix
# products into pieces in Llama's code; Cohere's modelling never reads it, so no value of it
# changes the model. Each is still checked for the type of value it must have.
PARALLELISM_KEYS = {"pretraining_tp": int, "use_parallel_embedding": bool}

# Keys older Cohere2 configs carry (Command R7B, written by transformers 4.48) that describe
# exactly what transformers builds anyway; any other value would be another model.
REQUIRED_VALUES = {
    "attention_bias": False,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "position_embedding_type": "rope_gptj",  # interleaved rotary: what the conversion permutes
    "rotary_pct": 1.0,
    "use_gated_activation": True,
    "use_embedding_sharing": True,
    "order_of_interleaved_layers": "local_attn_first",
    "mlp_bias": False,
    "use_parallel_block": True,  # attention and feed-forward read the same normalised input
}
# Cohere2 has no qk-norm; its files (tiny-aya) may still say so.
REQUIRED_VALUES_BY_TYPE = {"cohere": {}, "cohere2": {"use_qk_norm": False}}

# Cohere2 keys that restate the layer pattern: every n-th layer is full attention, the others
# sliding. transformers derives layer_types from `sliding_window_pattern` when the file has no
# layer_types, and otherwise reads none of them; each must agree with the layer types.
PATTERN_KEYS = ("sliding_window_pattern", "_sliding_window_pattern", "layer_switch")
DEFAULT_SLIDING_WINDOW_PATTERN = 4  # transformers' Cohere2Config, when the file says nothing

MAPPED_KEYS = {
    "cohere": frozenset(
        {
            "model_type",
            "architectures",
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
            "rope_theta",
            "rope_parameters",
            "rope_scaling",
            "layer_norm_eps",
            "logit_scale",
            "use_qk_norm",
        }
    ),  # fmt: skip
}
MAPPED_KEYS["cohere2"] = (MAPPED_KEYS["cohere"] - {"use_qk_norm"}) | {
    "sliding_window",
    "layer_types",
    *PATTERN_KEYS,
}


def _refuse(key: str, reason: str) -> ValueError:
    return ValueError(f"config.json: {key}: {reason}")


def palm_config_from_hf(hf: dict[str, Any]) -> PaLMConfig:
    """The PaLMConfig of a Cohere or Cohere2 `config.json`; anything else is refused by name."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _refuse(
            "model_type",
            f"{model_type!r} is not supported: palm_rlhf converts the PaLM-shaped Cohere family "
            "only, 'cohere' (Command-R, Aya 23, Aya Expanse) and 'cohere2' (Command R7B, "
            "tiny-aya)",
        )
    architectures = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if architectures != [ARCHITECTURES[model_type]]:
        raise _refuse("architectures", f"{architectures} is not [{ARCHITECTURES[model_type]!r}]")
    required = {**REQUIRED_VALUES, **REQUIRED_VALUES_BY_TYPE[model_type]}
    known = IGNORED_KEYS | set(PARALLELISM_KEYS) | set(required) | MAPPED_KEYS[model_type]
    unknown = sorted(set(hf) - known)
    if unknown:
        raise _refuse(
            ", ".join(unknown),
            f"unsupported option(s) for model_type {model_type!r}; converting would risk a "
            "model that computes something else",
        )
    for key, wanted in required.items():
        if key in hf and hf[key] != wanted:
            raise _refuse(key, f"{hf[key]!r} is not supported (only {wanted!r})")
    for key, kind in PARALLELISM_KEYS.items():
        value = hf.get(key)
        wrong_kind = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if key in hf and (wrong_kind or (kind is int and value < 1)):
            wanted = "a positive int" if kind is int else "true or false"
            raise _refuse(key, f"must be {wanted}, got {value!r}")
    heads, dim = _int(hf, "num_attention_heads"), _int(hf, "hidden_size")
    depth = _int(hf, "num_hidden_layers")
    dim_head = hf.get("head_dim") or dim // heads
    if model_type == "cohere2" and dim_head != dim // heads:
        # transformers' Cohere2Config sets head_dim = hidden_size // heads whatever the file says.
        raise _refuse("head_dim", f"{dim_head} is not hidden_size // num_attention_heads")
    logit_scale = hf.get("logit_scale", 0.0625)
    if not isinstance(logit_scale, int | float) or logit_scale <= 0:
        raise _refuse("logit_scale", f"must be a positive number, got {logit_scale!r}")
    attention = _attention_layout(hf, model_type, depth)
    return PaLMConfig(
        num_tokens=_int(hf, "vocab_size"),
        dim=dim,
        depth=depth,
        heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        dim_head=dim_head,
        ff_inner=_int(hf, "intermediate_size"),
        max_seq_len=_int(hf, "max_position_embeddings"),
        rotary_base=_rope_theta(hf),
        norm_eps=float(hf.get("layer_norm_eps") or 1e-5),
        logit_scale=float(logit_scale),
        qk_layernorm=bool(hf.get("use_qk_norm", False)),
        **attention,
    )


def _int(hf: dict[str, Any], key: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _refuse(key, f"must be a positive int, got {value!r}")
    return value


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta (transformers 4) or rope_parameters (transformers 5); only plain rotary."""
    scaling = hf.get("rope_scaling")
    if scaling not in (None, {}) and scaling.get("rope_type", scaling.get("type")) != "default":
        raise _refuse("rope_scaling", f"{scaling} is not supported (plain rotary only)")
    parameters = hf.get("rope_parameters") or {}
    if parameters.get("rope_type", "default") != "default":
        raise _refuse("rope_parameters", f"rope_type {parameters['rope_type']!r} is not supported")
    theta = parameters.get("rope_theta", hf.get("rope_theta"))
    if not isinstance(theta, int | float) or theta <= 0:
        # The default differs between transformers versions (10000 in 4.x, 500000 in 5.x).
        raise _refuse("rope_theta", f"must be given as a positive number, got {theta!r}")
    return float(theta)


def _attention_layout(hf: dict[str, Any], model_type: str, depth: int) -> dict[str, Any]:
    """Cohere: every layer full, with rotary. Cohere2: sliding-window layers with rotary and
    full layers without any position information, as transformers' Cohere2Attention does."""
    if model_type == "cohere":
        return {}
    types = hf.get("layer_types")
    if types is None:  # transformers 4.48's form: every pattern-th layer is full
        types = _pattern_layer_types(
            "sliding_window_pattern",
            hf.get("sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN),
            depth,
        )
    if (
        not isinstance(types, list)
        or len(types) != depth
        or set(types) - {"sliding_attention", "full_attention"}
    ):
        raise _refuse("layer_types", f"needs {depth} of 'sliding_attention'/'full_attention'")
    for key in PATTERN_KEYS:
        if key in hf and _pattern_layer_types(key, hf[key], depth) != types:
            full = [i for i, kind in enumerate(types) if kind == "full_attention"]
            raise _refuse(
                key,
                f"{hf[key]!r} says every {hf[key]}th layer is full attention, but the layer "
                f"types make layers {full} full; the file contradicts itself",
            )
    window = hf.get("sliding_window")
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not (isinstance(window, int) and window > 0):
        raise _refuse("sliding_window", f"sliding layers need a positive window, got {window!r}")
    return {
        "layer_types": tuple("sliding" if s else "full" for s in sliding),
        "sliding_window": window if any(sliding) else None,
        "rotary_layers": tuple(sliding),
    }


def _pattern_layer_types(key: str, pattern: Any, depth: int) -> list[str]:
    """transformers' derivation: layer i is full attention when (i + 1) % pattern == 0."""
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
        raise _refuse(key, f"must be a positive int, got {pattern!r}")
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(depth)]


def hf_config_from_palm(config: PaLMConfig, token_ids: dict[str, Any], dtype: str) -> dict:
    """The Cohere (or, with sliding layers or layers without rotary, Cohere2) config.json of a
    PaLMConfig; options the Cohere format cannot express are refused by name. token_ids: the
    tokenizer's bos_token_id, eos_token_id and pad_token_id."""
    for option, unsupported in (
        ("use_xpos", config.use_xpos),
        ("qk_norm", config.qk_norm),
        ("causal", not config.causal),
    ):
        if unsupported:
            detail = "the cosine qk-norm" if option == "qk_norm" else option
            raise ValueError(f"{option}: {detail} cannot be expressed in the Cohere format")
    rotary = [config.layer_has_rotary(i) for i in range(config.depth)]
    sliding = [config.layer_type(i) == "sliding" for i in range(config.depth)]
    cohere2 = any(sliding) or not all(rotary)
    common = {
        "vocab_size": config.num_tokens,
        "hidden_size": config.dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "intermediate_size": config.ff_inner_dim,
        "max_position_embeddings": config.max_seq_len,
        "layer_norm_eps": config.norm_eps,
        "logit_scale": config.logit_scale,
        "rope_theta": config.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": config.init_std,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        **token_ids,
    }
    if config.heads * config.dim_head != config.dim:
        if cohere2:
            raise ValueError(
                "dim_head: Cohere2 fixes head_dim = dim // heads; this model has "
                f"dim_head={config.dim_head} with dim={config.dim}, heads={config.heads}"
            )
        common["head_dim"] = config.dim_head
    if not cohere2:
        return {
            "model_type": "cohere",
            "architectures": [ARCHITECTURES["cohere"]],
            "use_qk_norm": config.qk_layernorm,
            **common,
        }
    if config.qk_layernorm:
        raise ValueError("qk_layernorm: Cohere2 has no qk-norm, and Cohere has no sliding layers")
    if rotary != sliding:
        raise ValueError(
            f"rotary_layers: Cohere2 rotates exactly its sliding layers; this model has "
            f"rotary_layers={tuple(rotary)} with layer_types={config.layer_types}"
        )
    return {
        "model_type": "cohere2",
        "architectures": [ARCHITECTURES["cohere2"]],
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "sliding_window": config.sliding_window,
        **common,
    }
