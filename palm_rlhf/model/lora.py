"""Scoped LoRA adapters (Hu et al. 2021).

Every projection in the model is a `LoRALinear`: a bias-free linear layer that can hold any
number of named adapters ("scopes", e.g. "actor" and "critic"). A forward pass names at most one
scope; with none, the layer is exactly the frozen base. That is how PPO gets its reference
policy for free: the same weights with adapters off, no copy (RLHF checklist item 9).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAConfig


class LoRAAdapter(nn.Module):
    """delta(x) = (alpha / rank) * up(down(x)); `up` starts at zero so a new adapter is a no-op."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoRAConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        place = dict(device=device, dtype=dtype)
        self.down = nn.Parameter(torch.empty(config.rank, in_features, **place))
        self.up = nn.Parameter(torch.zeros(out_features, config.rank, **place))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scaling = config.alpha / config.rank

    def forward(self, x: Tensor, base: Tensor) -> Tensor:
        """base + delta(x), where base is the frozen projection's output for x."""
        # The adapter trains in its own precision (float32) on a base kept in its stored one
        # (bf16): read the input in the adapter's dtype and hand the result back in the base's.
        # Under autocast the products run in its dtype whatever the input's, so a float32 copy
        # of the input would only be kept for backward, unused. The scale multiplies the rank-r
        # intermediate, not the full-width output: one (tokens x out_features) temporary fewer
        # (1.1 GB for Command R7B's fused projection over 8k tokens in float32).
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:
            x = x.to(self.down.dtype)
        down = F.linear(x, self.down) * self.scaling
        # `up` enters the product as a contiguous (rank, out) matrix: autograd then forms its
        # gradient as down^T @ grad, reading grad row by row. F.linear(down, up) forms
        # grad^T @ down instead, a strided walk over the full-width gradient that ran 10x slower
        # on CPU (12.5 ms against 1.2 ms at 3040 tokens x 1216 outputs, rank 8): a third of a
        # LoRA update's time. addmm also adds into base within the product, so no full-width
        # delta is materialised.
        up = self.up.t().contiguous()
        if autocast or base.dtype == down.dtype:
            return torch.addmm(base.flatten(0, -2), down.flatten(0, -2), up).view(base.shape)
        return base + (down @ up).to(base.dtype)

    def delta_weight(self) -> Tensor:
        return (self.up @ self.down) * self.scaling


class LoRALinear(nn.Linear):
    """A bias-free linear layer with optional named adapters, chosen per call.

    `packed` optionally holds an MKL-packed copy of the weight, with one scope's adapter folded
    in, for inference on CPU (see `palm_rlhf.generation.packed_weights`); it is only read when
    autograd is off and the call asks for that scope, and its product equals the unpacked
    path's up to float rounding.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.adapters = nn.ModuleDict()
        self.packed: tuple[Tensor, int, Tensor, str | None] | None = None

    def forward(self, x: Tensor, scope: str | None = None) -> Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            packed_weight, rows, weight, packed_scope = self.packed
            if scope == packed_scope:  # the scope's adapter is already folded into the copy
                return torch.ops.mkl._mkl_linear(x, packed_weight, weight, None, rows)
        out = F.linear(x, self.weight)
        if scope is not None and scope in self.adapters:
            out = self.adapters[scope](x, out)
        return out


def _registry(model: nn.Module) -> dict[str, LoRAConfig]:
    if not hasattr(model, "lora_configs"):
        model.lora_configs = {}
    return model.lora_configs


def add_lora(
    model: nn.Module, scope: str, config: LoRAConfig | None = None, freeze_base: bool = True
) -> list[nn.Parameter]:
    """Add a named adapter scope to every targeted projection and return its parameters.

    With freeze_base (the default) every parameter that is not an adapter stops requiring
    gradients, so an optimizer built from `lora_parameters(model, scope)` trains only it.
    """
    config = config or LoRAConfig()
    if not scope.isidentifier():
        raise ValueError(f"LoRA scope name must be an identifier, got {scope!r}")
    registry = _registry(model)
    if scope in registry:
        raise ValueError(f"LoRA scope {scope!r} already exists")
    targeted = [
        module
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear) and name.rsplit(".", 1)[-1] in config.targets
    ]
    if not targeted:
        raise ValueError(f"no projection named {config.targets} found for LoRA scope {scope!r}")
    for module in targeted:
        # On the base's device, in float32 however the base is stored (a bf16 base stays bf16;
        # its adapters train in float32), or in float64 beside a float64 base.
        weight = module.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        adapter = LoRAAdapter(module.in_features, module.out_features, config, weight.device, dtype)
        module.adapters[scope] = adapter
    registry[scope] = config
    if freeze_base:
        for name, param in model.named_parameters():
            if ".adapters." not in name:
                param.requires_grad_(False)
    return lora_parameters(model, scope)


def check_scope(model: nn.Module, scope: str | None) -> None:
    if scope is not None and scope not in _registry(model):
        known = sorted(_registry(model))
        raise ValueError(f"unknown LoRA scope {scope!r}; this model has {known or 'none'}")


def lora_parameters(model: nn.Module, scope: str) -> list[nn.Parameter]:
    check_scope(model, scope)
    return [p for name, p in model.named_parameters() if f".adapters.{scope}." in name]


def merge_lora(model: nn.Module, scope: str) -> None:
    """Fold a scope into the base weights (W += alpha/r * B A) and remove it.

    Afterwards the plain model (no scope) computes what the model with the scope did.
    """
    check_scope(model, scope)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear) and scope in module.adapters:
                module.weight += module.adapters[scope].delta_weight().to(module.weight.dtype)
                del module.adapters[scope]
    del _registry(model)[scope]


def remove_lora(model: nn.Module, scope: str) -> None:
    check_scope(model, scope)
    for module in model.modules():
        if isinstance(module, LoRALinear) and scope in module.adapters:
            del module.adapters[scope]
    del _registry(model)[scope]


def fold_policy_adapter(policy: nn.Module, keep: Collection[str] = ()) -> str | None:
    """Merge the one adapter scope a starting policy carries (a DPO run's "dpo", a GRPO run's
    "actor") into its base weights and return its name. A forward applies one scope at a time,
    so an unmerged adapter would silently not apply: RL would start from, and measure its KL
    against, the bare base instead of the policy the checkpoint holds. Several scopes are
    ambiguous (each is an alternative, not a sum) and refused. keep: scopes that are not the
    policy's (a reward model's, on the policy's shared base), left as they are."""
    scopes = sorted(set(policy.lora_configs) - set(keep))
    if len(scopes) > 1:
        raise ValueError(
            f"the policy carries several adapter scopes {scopes}; merge the one to start from "
            "(palm_rlhf.merge_lora) and remove the others"
        )
    if scopes:
        merge_lora(policy, scopes[0])
    return scopes[0] if scopes else None


@torch.no_grad()
def copy_scope(model: nn.Module, source: str, target: str) -> None:
    """Copy the adapter weights of scope `source` into scope `target` (same rank) in every
    layer that has both: a PPO critic that starts as the reward model's own scope."""
    copied = 0
    for module in model.modules():
        if isinstance(module, LoRALinear) and source in module.adapters:
            if target not in module.adapters:
                raise ValueError(f"scope {target!r} is missing where {source!r} is")
            module.adapters[target].load_state_dict(module.adapters[source].state_dict())
            copied += 1
    if not copied:
        raise ValueError(f"no layer has the LoRA scope {source!r}")
