"""A memory plan before a run: build a stage's models on fake tensors (torch's
FakeTensorMode: shapes and dtypes, no storage, no weights read) and run one step of the stage on
them, counting every tensor storage the step allocates until it is freed (`LiveBytes`). The
peak of the step's phases is what the device must hold; the plan splits it into the weights that
stay frozen, the trainable weights with their optimizer state, gradients, the KV cache of
generation, and activations (of which the output layer's logits chunks are a part).

What one step is, per stage (the phases of the real loops, at their shapes):
- pretrain / sft: one micro-batch of batch_size x seq_len tokens forward (loss from hidden
  states in chunks), backward, an AdamW step; a full fine-tune (float32 master weights) when
  lora_rank is 0, else a LoRA scope on the frozen base.
- reward: a LoRA (or full) reward model: batch_size preference groups of `responses` rows each,
  one pass, a ranking loss, backward, an AdamW step.
- dpo: the LoRA policy over batch_size x `responses` rows with their log-probs (the reference's
  were computed before training), backward, an AdamW step.
- grpo / ppo: generation (the KV cache of every response row, a prefill and decoding steps with
  sampling), then the old (and reference) log-probs and (PPO) the critic's values and the
  reward model's scores per minibatch without gradients, then a minibatch update: actor (and
  critic) forward, backward, an AdamW step. PPO's critic and reward model are scopes on the
  policy's base (one base for every role, as `palm-rlhf ppo` loads them).

Not counted: the allocator's slack and fragmentation, CUDA's context and kernels' workspaces
(about 0.5-1 GB on a GPU), the data a loop holds on the host.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .config import LoRAConfig, PaLMConfig
from .losses.logprobs import CHUNK_ELEMENTS
from .model.palm import PaLM
from .model.reward import RewardConfig, RewardModel
from .training.step import BASE_DTYPES

STAGES = ("pretrain", "sft", "reward", "dpo", "grpo", "ppo")
CATEGORIES = (
    "frozen weights",
    "trainable weights + optimizer state",
    "gradients",
    "KV cache",
    "activations",
)


@dataclass(frozen=True)
class PlanSettings:
    """The shape of one step of a stage (the fields the stage's flags set)."""

    stage: str
    batch_size: int = 1
    """pretrain/sft/reward/dpo: sequences (or preference groups) per micro-batch."""
    seq_len: int = 512
    """pretrain/sft/reward/dpo: tokens per row."""
    responses: int = 2
    """reward/dpo: rows per preference group (2 for pairs)."""
    rollout_rows: int = 128
    """grpo/ppo: responses sampled per iteration on one device (prompts x group size)."""
    max_prompt_tokens: int = 128
    max_new_tokens: int = 64
    minibatch_size: int = 32
    lora_rank: int = 8
    """The LoRA scopes' rank; pretrain/sft: 0 is a full fine-tune."""
    lora_alpha: float = 16.0
    full_finetune: bool = False
    kl_coef: float = 0.04
    """grpo: 0 skips the reference pass."""
    stored_dtype: str = "float32"
    """The dtype the checkpoint holds its weights in; the frozen base stays in it."""
    base_dtype: str = "stored"
    mixed_precision: str = "no"
    activation_checkpointing: bool = False
    processes: int = 1
    """Processes the run is launched on (accelerate launch --num_processes)."""
    fsdp: bool = False
    """Shard the models over the processes (FSDP2): the plan is then one process's share."""
    sample_gathered: bool = True
    """grpo/ppo with fsdp: decode with the policy gathered whole (else sharded, two blocks)."""

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")

    @property
    def trains_every_weight(self) -> bool:
        """A full fine-tune (float32 master weights), not a LoRA scope on a frozen base."""
        return self.full_finetune or (self.stage in ("pretrain", "sft") and self.lora_rank == 0)


@dataclass
class MemoryPlan:
    """The peak bytes of a step and what they hold at that moment."""

    peak_bytes: int
    phase: str
    categories: dict[str, int]
    logits_chunk_bytes: int
    parameters: int
    phases: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.phase,
            "categories_bytes": self.categories,
            "logits_chunk_bytes": self.logits_chunk_bytes,
            "parameters": self.parameters,
            "phases_peak_bytes": self.phases,
        }


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def plan_memory(config: PaLMConfig, settings: PlanSettings) -> MemoryPlan:
    """The memory plan of one step of `settings.stage` for a model of `config`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if settings.stage not in STAGES:
        raise ValueError(f"stage: {settings.stage!r} is not one of {', '.join(STAGES)}")
    with FakeTensorMode():
        return _plan(config, settings)


def _plan(config: PaLMConfig, s: PlanSettings) -> MemoryPlan:
    full = s.trains_every_weight
    stored = BASE_DTYPES[s.stored_dtype] or torch.float32
    base_dtype = torch.float32 if full else (BASE_DTYPES[s.base_dtype] or stored)
    lora = LoRAConfig(rank=s.lora_rank, alpha=s.lora_alpha) if not full else None
    policy = PaLM(config).eval()
    for param in policy.parameters():  # (Module.to cannot swap fake tensors)
        param.data = param.data.to(base_dtype)
    reward_model = None
    if s.stage == "reward":
        reward_model = RewardModel(policy, RewardConfig(lora_rank=0 if full else s.lora_rank))
        trained = reward_model.trainable_parameters()
    elif full:
        trained = list(policy.parameters())
    else:  # (a LoRA SFT's scope is "sft"; any name costs the same)
        trained = policy.add_lora("actor", lora)
        if s.stage == "ppo":  # critic and reward: scopes on the same base
            reward_model = RewardModel(policy, RewardConfig(lora_rank=s.lora_rank))
            policy.add_lora("critic", lora, freeze_base=False)
            trained = trained + [p for n, p in policy.named_parameters() if ".critic." in n]
    for param in trained:
        param.data = param.data.float()
        param.requires_grad_(True)
    policy.set_activation_checkpointing(s.activation_checkpointing)
    trained_ids = {id(p) for p in trained}
    module = reward_model if reward_model is not None else policy
    frozen = _bytes(p for p in module.parameters() if id(p) not in trained_ids)
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
    _warm_up(optimizer, trained)  # a step in a run holds the optimizer's state from step 1 on
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.mixed_precision == "bf16")

    phases: dict[str, tuple[int, int, int]] = {}  # phase -> (peak, gradients at peak, kv)

    def run(name: str, step) -> None:
        resident = _tensors(module, optimizer)
        with LiveBytes(
            resident, lambda: _bytes(p.grad for p in trained if p.grad is not None)
        ) as live:
            kv = step() or 0
        phases[name] = (live.peak, live.grads_at_peak, kv)

    vocab = config.num_tokens
    if s.stage in ("pretrain", "sft", "reward", "dpo"):
        rows = s.batch_size * (s.responses if s.stage in ("reward", "dpo") else 1)
        tokens = torch.zeros(rows, s.seq_len + 1, dtype=torch.long)

        def supervised() -> None:
            with autocast:
                if s.stage == "reward":
                    scores = _scores(reward_model, tokens[:, :-1])
                    loss = scores.float().logsumexp(0) - scores.float().mean()
                else:
                    scope = None if full else "actor"
                    stats = policy(tokens[:, :-1], validate_ids=False, lora_scope=scope,
                                   targets=tokens[:, 1:])  # fmt: skip
                    loss = -stats.logprobs.mean() + 1e-4 * stats.log_z.square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        run("training step", supervised)
    else:
        rows, p, n = s.rollout_rows, s.max_prompt_tokens, s.max_new_tokens
        scope = None if full else "actor"

        def generation() -> int:
            from .generation import sample_next

            with torch.no_grad(), autocast:
                cache = policy.new_cache(rows, max_len=p + n)
                prompt = torch.zeros(rows, p, dtype=torch.long)
                logits = policy(prompt, cache=cache, last_only=True, validate_ids=False,
                                lora_scope=scope)[:, -1]  # fmt: skip
                for _ in range(2):  # each decoding step is the same size
                    token, _ = sample_next(logits, 1.0, None, None, None)
                    logits = policy(token[:, None], cache=cache, validate_ids=False,
                                    lora_scope=scope)[:, -1]  # fmt: skip
                return _bytes([cache.keys, cache.values])

        run("generation", generation)
        sequences = torch.zeros(rows, p + n, dtype=torch.long)
        chunk = sequences[: s.minibatch_size]

        def scoring() -> None:
            with torch.no_grad(), autocast:
                passes = [scope] + ([None] if s.stage == "ppo" or s.kl_coef > 0 else [])
                for pass_scope in passes:  # old, then reference (adapters off)
                    policy(chunk[:, :-1], validate_ids=False, lora_scope=pass_scope,
                           targets=chunk[:, p:])  # fmt: skip
                if s.stage == "ppo":
                    policy.forward_hidden(chunk, validate_ids=False, lora_scope="critic")
                    _scores(reward_model, chunk)

        run("log-probs and scores", scoring)

        def update() -> None:
            with autocast:
                stats = policy(chunk[:, :-1], validate_ids=False, lora_scope=scope,
                               targets=chunk[:, p:], entropy=s.stage == "ppo")  # fmt: skip
                loss = -stats.logprobs.mean()
                if s.stage == "ppo":
                    hidden = policy.forward_hidden(chunk, validate_ids=False, lora_scope="critic")
                    loss = loss + hidden.float().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        run("minibatch update", update)

    trainable = _bytes(trained) + _bytes(_optimizer_state(optimizer))
    split = {  # phase -> the bytes of each category at the phase's peak
        name: _split(peak, gradients, kv, frozen, trainable)
        for name, (peak, gradients, kv) in phases.items()
    }
    if s.fsdp:
        units = _Units(policy, module, optimizer, trained_ids, s.processes, s.sample_gathered)
        split = {name: units.per_process(name, categories) for name, categories in split.items()}
    totals = {name: sum(categories.values()) for name, categories in split.items()}
    phase = max(totals, key=totals.get)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // vocab)
    return MemoryPlan(
        peak_bytes=totals[phase],
        phase=phase,
        categories=split[phase],
        logits_chunk_bytes=rows_per_chunk * vocab * 4,
        parameters=sum(p.numel() for p in module.parameters()),
        phases=totals,
    )


def _split(peak: int, gradients: int, kv: int, frozen: int, trainable: int) -> dict[str, int]:
    """A phase's peak in CATEGORIES: what is not weights, optimizer state, gradients or the KV
    cache is activations (temporaries included)."""
    activations = max(0, peak - frozen - trainable - gradients - kv)
    return dict(zip(CATEGORIES, (frozen, trainable, gradients, kv, activations), strict=True))


GATHERED = "gathered weights (FSDP)"
BACKWARD_PHASES = ("training step", "minibatch update")


class _Units:
    """One process's share of a phase under FSDP2, as `training.fsdp` shards: every weight,
    optimizer state and gradient split dim-0 across the processes (padded to equal shards),
    plus what is whole at that moment. Training and scoring passes gather the embedding's unit
    for the whole pass and one block at a time with the next one prefetched (two blocks);
    generation gathers the whole model once (`training.fsdp.gathered`), or, not
    sample_gathered, decodes like any other pass. In backward a unit's gradient is whole until
    it is reduce-scattered, from a copy: one unit's worth more than the whole-model run's
    gradients at that moment (which the shards replace). Activations and the KV cache are the
    process's own, as measured."""

    def __init__(
        self, policy: PaLM, module, optimizer, trained_ids: set[int], processes: int,
        sample_gathered: bool,
    ) -> None:  # fmt: skip
        self.processes, self.sample_gathered = processes, sample_gathered
        blocks = [list(block.parameters()) for block in policy.blocks]
        in_blocks = {id(p) for params in blocks for p in params}
        root = [p for p in module.parameters() if id(p) not in in_blocks]
        self.whole = _bytes(module.parameters())
        self.gathered = _bytes(root) + 2 * max(_bytes(params) for params in blocks)
        trained_units = [[p for p in unit if id(p) in trained_ids] for unit in [root, *blocks]]
        self.unit_gradients = max(_bytes(unit) for unit in trained_units)
        self.frozen = self._shard([p for p in module.parameters() if id(p) not in trained_ids])
        self.trainable = self._shard(
            [p for p in module.parameters() if id(p) in trained_ids]
        ) + self._shard(_optimizer_state(optimizer))

    def _shard(self, tensors) -> int:
        """Bytes of this process's shards: ceil(rows / processes) rows of each tensor."""
        total = 0
        for t in tensors:
            rows = t.shape[0] if t.ndim else 1
            row_bytes = t.numel() // max(rows, 1) * t.element_size()
            total += math.ceil(rows / self.processes) * row_bytes
        return total

    def per_process(self, phase: str, categories: dict[str, int]) -> dict[str, int]:
        gradients = math.ceil(categories["gradients"] / self.processes)
        if phase in BACKWARD_PHASES:
            gradients += self.unit_gradients
        return {
            "frozen weights": self.frozen,
            "trainable weights + optimizer state": self.trainable,
            "gradients": gradients,
            "KV cache": categories["KV cache"],
            "activations": categories["activations"],
            GATHERED: self.whole
            if phase == "generation" and self.sample_gathered
            else self.gathered,
        }


def _scores(reward_model: RewardModel, tokens: torch.Tensor) -> torch.Tensor:
    """`RewardModel.forward` without its id check (which reads values a fake tensor lacks)."""
    hidden = reward_model.trunk.forward_hidden(
        tokens, validate_ids=False, lora_scope=reward_model.lora_scope
    )
    return reward_model.head(hidden[:, -1]).squeeze(-1)


def _tensors(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers(), *_optimizer_state(optimizer)]


def _optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


def _warm_up(optimizer: torch.optim.Optimizer, trained: list[torch.Tensor]) -> None:
    """Create the optimizer's state (AdamW: two moments per trained tensor) the way a first
    step does, so the planned step is a steady-state one."""
    for param in trained:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class LiveBytes(TorchDispatchMode):
    """Exact accounting of the bytes alive during the ops run under it: every storage an op
    returns is counted once, from its creation until it is freed (a weak reference's
    callback), on top of the `resident` tensors that exist before (weights, optimizer state;
    a view of one, such as a transposed weight, is no new memory). The peak and the
    gradients alive at that moment are kept."""

    def __init__(self, resident: list[torch.Tensor], gradient_bytes) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        for tensor in resident:
            storage = tensor.untyped_storage()
            if storage not in self._seen:
                self._seen[storage] = storage.nbytes()
                self.current += storage.nbytes()
        self.peak = self.current
        self.gradient_bytes, self.grads_at_peak = gradient_bytes, gradient_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                self._count(tensor.untyped_storage())  # (an MKL-packed weight has none)
        return out

    def _count(self, storage) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        weakref.finalize(storage, self._free, size)
        self.current += size
        if self.current > self.peak:
            self.peak = self.current
            self.grads_at_peak = self.gradient_bytes()

    def _free(self, size: int) -> None:
        self.current -= size


def parse_size(text: str) -> int:
    """'80GB', '24GiB', '512MB', '1e9' -> bytes (GB = 1e9, GiB = 2**30)."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"device memory: {text!r} is not a size like 80GB or 24GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"device memory: {text!r} must be positive")
    return int(value)
