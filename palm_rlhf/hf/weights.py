"""Cohere tensors <-> PaLM tensors, planned up front and computed one at a time.

  Hugging Face (per layer i: model.layers.i.)      palm_rlhf (blocks.i.)
  input_layernorm.weight                           norm.weight
  self_attn.{q,k,v}_proj, mlp.{up,gate}_proj        fused_proj.weight (rows in that order)
  self_attn.o_proj.weight                          attn_out.weight
  mlp.down_proj.weight                             ff_out.weight
  self_attn.{q,k}_norm.weight  (heads, d), (k, d)  qk_norm_weight (h + k, d), queries first
  model.embed_tokens.weight (= lm_head.weight)     token_emb.weight
  model.norm.weight                                norm.weight

Cohere rotates interleaved channel pairs (0, 1), (2, 3), ... of each head; palm_rlhf rotates
(j, j + d/2). Reordering every query and key head's channels as evens then odds turns one into
the other (`rotary_permutation`), and leaves q.k unchanged because queries and keys are
reordered alike; a qk-norm's per-channel weights follow the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..config import LoRAConfig, PaLMConfig
from ..storage.atomic import read_json
from ..storage.checkpoint import WEIGHTS_NAME
from ..storage.safetensors import SAFETENSORS_DTYPES, TensorPlan, cast

INDEX_NAME = "model.safetensors.index.json"
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def rotary_permutation(dim_head: int) -> Tensor:
    """ours[j] = cohere[perm[j]]: even channels (first of each rotated pair), then odd ones."""
    return torch.cat((torch.arange(0, dim_head, 2), torch.arange(1, dim_head, 2)))


class SafetensorsDir:
    """The tensors of a checkpoint directory, one model.safetensors or the shards its
    model.safetensors.index.json lists, memory-mapped: a tensor is read when asked for."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index, single = self.directory / INDEX_NAME, self.directory / WEIGHTS_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map'")
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif single.is_file():
            self.files = dict.fromkeys(self._open(single).keys(), single)
        else:
            pickled = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt")
            )
            hint = f" (pickled weights {pickled} are never read)" if pickled else ""
            raise FileNotFoundError(f"{self.directory}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing weights shard")
        return safe_open(str(path), framework="pt")

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self.files)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        view = self._handle(name).get_slice(name)
        return tuple(view.get_shape()), DTYPES_BY_NAME[view.get_dtype()]

    def get(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        return cast(self._handle(name).get_tensor(name), dtype)


# ----------------------------------------------------------------------------- Cohere -> PaLM


def hf_shapes(config: PaLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Cohere checkpoint of this config holds (lm_head aside: it is tied)."""
    dim, d, inner = config.dim, config.dim_head, config.ff_inner_dim
    q_rows, kv_rows = config.heads * d, config.kv_heads * d
    shapes = {"model.embed_tokens.weight": (config.num_tokens, dim)}
    for i in range(config.depth):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_rows, dim)
        shapes[p + "self_attn.k_proj.weight"] = (kv_rows, dim)
        shapes[p + "self_attn.v_proj.weight"] = (kv_rows, dim)
        shapes[p + "self_attn.o_proj.weight"] = (dim, q_rows)
        if config.qk_layernorm:
            shapes[p + "self_attn.q_norm.weight"] = (config.heads, d)
            shapes[p + "self_attn.k_norm.weight"] = (config.kv_heads, d)
        shapes[p + "mlp.gate_proj.weight"] = (inner, dim)
        shapes[p + "mlp.up_proj.weight"] = (inner, dim)
        shapes[p + "mlp.down_proj.weight"] = (dim, inner)
        shapes[p + "input_layernorm.weight"] = (dim,)
    shapes["model.norm.weight"] = (dim,)
    return shapes


def check_hf_tensors(config: PaLMConfig, source: SafetensorsDir) -> None:
    """Refuse, naming each, missing, unexpected and misshapen tensors, and an untied lm_head."""
    expected = hf_shapes(config)
    names = source.names()
    problems = []
    if missing := sorted(set(expected) - names):
        problems.append(f"missing tensors {missing}")
    if unexpected := sorted(names - set(expected) - {"lm_head.weight"}):
        problems.append(f"unexpected tensors {unexpected} (biases or another architecture?)")
    for name in sorted(set(expected) & names):
        shape, _ = source.shape_dtype(name)
        if shape != expected[name]:
            problems.append(f"{name}: shape {shape}, the config implies {expected[name]}")
    if problems:
        raise ValueError(f"{source.directory}: " + "; ".join(problems))
    if "lm_head.weight" in names and not torch.equal(
        source.get("lm_head.weight"), source.get("model.embed_tokens.weight")
    ):
        raise ValueError(
            f"{source.directory}: lm_head.weight differs from model.embed_tokens.weight; "
            "untied output embeddings are not supported"
        )


def palm_plans(
    config: PaLMConfig, source: SafetensorsDir, dtype: torch.dtype | None
) -> dict[str, TensorPlan]:
    """The PaLM tensors of a Cohere checkpoint, each computed when written. Every tensor keeps
    its file's dtype unless `dtype` is given; a fused projection takes its query's dtype."""
    check_hf_tensors(config, source)
    perm = rotary_permutation(config.dim_head)
    d = config.dim_head

    def copy(name: str) -> TensorPlan:
        shape, stored = source.shape_dtype(name)
        return TensorPlan(shape, dtype or stored, lambda: source.get(name, dtype or stored))

    def head_rows(name: str, out: torch.dtype) -> Tensor:  # (heads * d, dim), rows per head
        return source.get(name, out).unflatten(0, (-1, d))[:, perm].flatten(0, 1)

    def fused(p: str, out: torch.dtype) -> Callable[[], Tensor]:
        return lambda: torch.cat(
            (
                head_rows(p + "self_attn.q_proj.weight", out),
                head_rows(p + "self_attn.k_proj.weight", out),
                source.get(p + "self_attn.v_proj.weight", out),
                source.get(p + "mlp.up_proj.weight", out),  # SwiGLU value
                source.get(p + "mlp.gate_proj.weight", out),  # SwiGLU gate
            )
        )

    def qk_norm(p: str, out: torch.dtype) -> Callable[[], Tensor]:
        return lambda: torch.cat(
            (
                source.get(p + "self_attn.q_norm.weight", out)[:, perm],
                source.get(p + "self_attn.k_norm.weight", out)[:, perm],
            )
        )

    plans = {"token_emb.weight": copy("model.embed_tokens.weight")}
    fused_rows = (config.heads + 2 * config.kv_heads) * d + 2 * config.ff_inner_dim
    for i in range(config.depth):
        p, ours = f"model.layers.{i}.", f"blocks.{i}."
        out = dtype or source.shape_dtype(p + "self_attn.q_proj.weight")[1]
        plans[ours + "norm.weight"] = copy(p + "input_layernorm.weight")
        plans[ours + "fused_proj.weight"] = TensorPlan((fused_rows, config.dim), out, fused(p, out))
        plans[ours + "attn_out.weight"] = copy(p + "self_attn.o_proj.weight")
        plans[ours + "ff_out.weight"] = copy(p + "mlp.down_proj.weight")
        if config.qk_layernorm:
            shape = (config.heads + config.kv_heads, d)
            plans[ours + "qk_norm_weight"] = TensorPlan(shape, out, qk_norm(p, out))
    plans["norm.weight"] = copy("model.norm.weight")
    return plans


# ----------------------------------------------------------------------------- PaLM -> Cohere


def hf_plans(
    config: PaLMConfig,
    source: SafetensorsDir,
    lora: tuple[str, LoRAConfig] | None,
    dtype: torch.dtype,
) -> dict[str, TensorPlan]:
    """The Cohere tensors of a PaLM checkpoint in `dtype`, with the `lora` scope (name,
    config) folded into the weights it adapts: W + (alpha / rank) up @ down, computed in
    float32 (as `merge_lora` does for a float32 model)."""
    inverse = torch.argsort(rotary_permutation(config.dim_head))
    d, shapes = config.dim_head, hf_shapes(config)
    sizes = [
        config.heads * d,
        config.kv_heads * d,
        config.kv_heads * d,
        config.ff_inner_dim,
        config.ff_inner_dim,
    ]
    memo: dict[str, Tensor] = {}  # the last merged fused projection: five tensors come from it

    def merged(name: str) -> Tensor:
        if name in memo:
            return memo[name]
        weight = source.get(name + ".weight", torch.float32)
        if lora is not None and f"{name}.adapters.{lora[0]}.up" in source.names():
            up = source.get(f"{name}.adapters.{lora[0]}.up", torch.float32)
            down = source.get(f"{name}.adapters.{lora[0]}.down", torch.float32)
            weight = weight + (up @ down) * (lora[1].alpha / lora[1].rank)
        memo.clear()
        memo[name] = weight
        return weight

    def plain(name: str) -> Callable[[], Tensor]:
        return lambda: source.get(name, dtype)

    def piece(block: str, index: int, heads: bool) -> Callable[[], Tensor]:
        def produce() -> Tensor:
            rows = merged(block + "fused_proj").split(sizes)[index]
            if heads:  # back to Cohere's interleaved channel order
                rows = rows.unflatten(0, (-1, d))[:, inverse].flatten(0, 1)
            return rows.to(dtype)

        return produce

    def qk_norm(block: str, queries: bool) -> Callable[[], Tensor]:
        def produce() -> Tensor:
            weight = source.get(block + "qk_norm_weight", dtype)
            return (weight[: config.heads] if queries else weight[config.heads :])[:, inverse]

        return produce

    def adapted(name: str) -> Callable[[], Tensor]:
        return lambda: merged(name).to(dtype)

    producers: dict[str, Callable[[], Tensor]] = {
        "model.embed_tokens.weight": plain("token_emb.weight")
    }
    for i in range(config.depth):
        p, ours = f"model.layers.{i}.", f"blocks.{i}."
        producers[p + "self_attn.q_proj.weight"] = piece(ours, 0, heads=True)
        producers[p + "self_attn.k_proj.weight"] = piece(ours, 1, heads=True)
        producers[p + "self_attn.v_proj.weight"] = piece(ours, 2, heads=False)
        producers[p + "mlp.up_proj.weight"] = piece(ours, 3, heads=False)
        producers[p + "mlp.gate_proj.weight"] = piece(ours, 4, heads=False)
        producers[p + "self_attn.o_proj.weight"] = adapted(ours + "attn_out")
        producers[p + "mlp.down_proj.weight"] = adapted(ours + "ff_out")
        if config.qk_layernorm:
            producers[p + "self_attn.q_norm.weight"] = qk_norm(ours, queries=True)
            producers[p + "self_attn.k_norm.weight"] = qk_norm(ours, queries=False)
        producers[p + "input_layernorm.weight"] = plain(ours + "norm.weight")
    producers["model.norm.weight"] = plain("norm.weight")
    return {name: TensorPlan(shapes[name], dtype, producers[name]) for name in producers}
