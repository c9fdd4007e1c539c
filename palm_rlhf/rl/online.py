"""What the online trainers (PPO, GRPO) share around their iterations, written once:

- `reward_sources`: a reward model and/or any number of weighted Python reward functions, taken
  the same way by both trainers;
- `setup_actor`: the policy the checkpoint holds (an adapter it carries folded in), its
  reference (the same base with adapters off; with full_finetune, a frozen copy) and the
  parameters that train (the "actor" LoRA scope, or every weight);
- `online_accelerator`, `set_online_dtypes`, `place_models` and `shard_online_models`: the
  accelerator at the config's precision, trained parameters in float32 beside a frozen base
  kept as stored, and the models on the device, or sharded onto it with FSDP2 when asked;
- `make_generators` and `make_engine`: the per-process sampling and shuffling generators and the
  `RolloutEngine` built from a trainer's config;
- `OnlineRun`: the run directory (its JSONL files claimed once, continued on resume) and the
  trainer's state saved and restored through `run_state`;
- `score_metrics` and `ShapingAlarm`: each reward source's mean before the score RL optimises,
  and a warning, once, when shaping (no_eos_penalty, score_clip, overlong_buffer) changed more
  than a fifth of an iteration's scores: the user's reward is what gets optimised unless asked;
- `OnlineTrainer` and `run_iterations`: the iteration driver both `train` methods call, and
  what it needs of a trainer, as a typed protocol.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import LoRAConfig
from ..model.lora import fold_policy_adapter, lora_parameters
from ..model.palm import PaLM, read_base_digest
from ..model.reward import RewardModel
from ..progress import progress_kwargs
from ..storage.atomic import read_json
from ..storage.checkpoint import resolve_run_dir
from ..tokenizers.base import Tokenizer
from ..training.fsdp import shard_models
from ..training.runs import append_jsonl, claim_run_dir, rank0_decides, truncate_metrics
from ..training.step import FULL_FINETUNE_BASE_DTYPE, set_training_dtypes
from .rollout import RewardFn, RewardSources, RolloutEngine, Samples
from .run_state import load_rl_state, save_rl_state

ACTOR = "actor"
RewardSpec = RewardFn | tuple[str, RewardFn, float]


def reward_functions(specs: Sequence[RewardSpec]) -> tuple[tuple[str, RewardFn, float], ...]:
    """Callables (weight 1, named after themselves) or (name, fn, weight) triples."""
    out = []
    for spec in specs:
        if callable(spec):
            out.append((getattr(spec, "__name__", "reward_fn"), spec, 1.0))
        else:
            name, fn, weight = spec
            out.append((str(name), fn, float(weight)))
    names = [name for name, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"reward functions need distinct names, got {names}")
    return tuple(out)


def reward_sources(
    reward_model: RewardModel | None,
    reward_model_weight: float,
    reward_fns: Sequence[RewardSpec],
) -> RewardSources:
    """The score both trainers optimise: reward_model_weight * the reward model's normalised
    score (if given) + sum of weight * fn(prompts, responses, **fields). At least one source."""
    return RewardSources(reward_model, reward_model_weight, reward_functions(reward_fns))


class Actor(NamedTuple):
    """The trained side of a policy: its reference, the LoRA scope it samples under (None for a
    full fine-tune) and the parameters the optimizer steps."""

    reference: PaLM
    scope: str | None
    params: list[nn.Parameter]


def setup_actor(
    policy: PaLM, full_finetune: bool, lora: LoRAConfig, reward_model: RewardModel | None = None
) -> Actor:
    """Start from the policy the checkpoint holds (a PPO/GRPO/DPO adapter it carries merged in);
    with LoRA the reference is the same module with adapters off, so no weight is copied. A
    reward model on the policy's own base (`load_reward_model`) keeps its scope unmerged."""
    shared = reward_model is not None and reward_model.trunk is policy
    if shared and full_finetune:
        raise ValueError(
            "full_finetune: the policy's base is the reward model's trunk here, and a full "
            "fine-tune would change the reward; load the reward model on its own trunk "
            "(RewardModel.from_pretrained)"
        )
    fold_policy_adapter(policy, keep=[reward_model.lora_scope] if shared else [])
    if full_finetune:
        # eval(): dropout off in the reference too (checklist 5)
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
        return Actor(reference, None, list(policy.requires_grad_(True).parameters()))
    return Actor(policy, ACTOR, policy.add_lora(ACTOR, lora))  # add_lora freezes the base


def place_models(models: Sequence[nn.Module | None], config: Any, accelerator: Accelerator) -> None:
    """The given models on the accelerator's device; with config.fsdp left where they are:
    sharding moves each unit as it shards it, so a device never holds a whole model."""
    if config.fsdp:
        return
    for model in models:
        if model is not None:
            model.to(accelerator.device)


def shard_online_models(
    models: Sequence[nn.Module | None], policy: PaLM, actor: Actor, accelerator: Accelerator
) -> list[nn.Parameter]:
    """Shard every model of the trainer with FSDP2 (`training.fsdp.shard_models`) and return
    the actor's parameters again: sharding replaces each parameter with its sharded one."""
    shard_models(models, accelerator)
    if actor.scope is None:
        return list(policy.parameters())
    return lora_parameters(policy, actor.scope)


def online_accelerator(accelerator: Accelerator | None, mixed_precision: str) -> Accelerator:
    """The trainer's accelerator: the one given, which must run at the config's precision (an
    accelerator fixes it once per process), or a new one at that precision."""
    if accelerator is None:
        return Accelerator(mixed_precision=mixed_precision)
    if accelerator.mixed_precision != mixed_precision:
        raise ValueError(
            f"mixed_precision: the config asks for {mixed_precision!r}, the accelerator given "
            f"runs at {accelerator.mixed_precision!r}; make it with "
            f"Accelerator(mixed_precision={mixed_precision!r})"
        )
    return accelerator


def set_online_dtypes(
    models: Sequence[nn.Module | None], trained: Sequence[nn.Parameter], config: Any
) -> None:
    """Trained parameters (actor, critic, heads) in float32; every frozen weight of the given
    models (policy base, reference, critic trunk, reward model) as stored, or in the config's
    base_dtype. One call over every model, since models share modules (a critic on the
    policy's base). config: a PPOConfig or GRPOConfig."""
    if config.full_finetune and config.base_dtype != "stored":
        raise ValueError(FULL_FINETUNE_BASE_DTYPE)
    for model in models:
        if model is not None:
            set_training_dtypes(model, trained, config.base_dtype, config.mixed_precision)


def load_reward_model(
    directory: str | Path, policy: PaLM, policy_dir: str | Path | None = None,
    share_base: bool = True,
) -> tuple[RewardModel, str | None]:  # fmt: skip
    """The reward model saved in `directory`, and a notice when it costs a second trunk.

    When it is a LoRA scope on the policy's base weights (the digest its checkpoint records
    equals the policy's) and share_base (the policy's base stays frozen: LoRA, not a full
    fine-tune), it is loaded onto the policy itself: one base in memory for policy, reference,
    reward and (PPO) critic. Otherwise it gets its own trunk, and the notice says why and what
    that costs. policy_dir: the checkpoint the policy came from, whose recorded digest spares
    hashing the policy when it was loaded unchanged (as stored, no adapter folded in).
    """
    reward_config = read_json(resolve_run_dir(Path(directory)) / "reward_config.json")
    saved = read_base_digest(directory)
    if not share_base:
        why = "the policy trains every weight (full_finetune), so it cannot share its base"
    elif reward_config.get("lora_rank", 0) == 0:
        why = "the reward model is fully fine-tuned, not a LoRA scope"
    elif saved is None:
        why = "its checkpoint records no base digest (saved by an older palm_rlhf)"
    else:
        # An adapter the policy checkpoint carried was folded into the base (its lora.json says
        # so): then hash what is held instead of trusting the recorded digest.
        recorded = None
        if policy_dir is not None:
            folded = (resolve_run_dir(Path(policy_dir)) / "lora.json").is_file()
            recorded = None if folded else read_base_digest(policy_dir)
        if saved == (recorded or policy.base_digest()):
            return RewardModel.from_pretrained_on(directory, policy), None
        why = "its base weights differ from the policy's"
    reward_model = RewardModel.from_pretrained(directory)
    size = sum(t.numel() * t.element_size() for t in reward_model.trunk.base_tensors().values())
    return reward_model, f"the reward model gets its own trunk ({why}): {size / 1e9:.2f} GB more"


class SamplingConfig(Protocol):
    """The config fields the rollout engine reads (PPOConfig and GRPOConfig both have them)."""

    seed: int
    max_new_tokens: int
    max_prompt_tokens: int
    temperature: float
    no_eos_penalty: float | None
    score_clip: float
    fsdp: bool
    sample_gathered: bool


def make_generators(seed: int, accelerator: Accelerator) -> tuple[torch.Generator, torch.Generator]:
    """(sampling, shuffling) generators of this process. Sampling draws on the policy's device (a
    CPU generator cannot drive CUDA sampling); minibatch order is drawn on the CPU. Seeds differ
    per process, so each rank samples its own responses (checklist item 17)."""
    rank = accelerator.process_index
    sampling = torch.Generator(device=accelerator.device).manual_seed(seed + rank)
    shuffling = torch.Generator().manual_seed(seed + 1_000_003 * (rank + 1))
    return sampling, shuffling


def make_engine(
    policy: PaLM,
    actor: Actor,
    tokenizer: Tokenizer,
    rewards: RewardSources,
    generator: torch.Generator,
    config: SamplingConfig,
    accelerator: Accelerator,
) -> RolloutEngine:
    return RolloutEngine(
        policy,
        actor.reference,
        actor.scope,
        tokenizer,
        rewards,
        generator,
        max_new_tokens=config.max_new_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        temperature=config.temperature,
        no_eos_penalty=config.no_eos_penalty,
        score_clip=config.score_clip,
        autocast=accelerator.autocast,
        stop_together=all_processes(accelerator) if sharded_sampling(config) else None,
    )


def gather_rows(x: Tensor, accelerator: Accelerator) -> Tensor:
    """Every process's rows of x, concatenated in process order (x itself with one process)."""
    return x if accelerator.num_processes == 1 else accelerator.gather(x)


def score_metrics(
    samples: Samples, rewards: RewardSources, accelerator: Accelerator
) -> dict[str, float]:
    """Over every process's rows, in this order: each reward source's raw mean and std
    (`reward/<name>`, `reward/<name>_std`: what the user asked for), then the score RL
    optimises (`score_mean`, `score_std`: the weighted sum after any shaping) and
    `score_shaped_share`, the share of responses whose score shaping changed."""
    parts = gather_rows(samples.reward_parts, accelerator)
    scores = gather_rows(samples.scores, accelerator)
    weights = torch.tensor(rewards.weights, dtype=parts.dtype, device=parts.device)
    out = {}
    for column, name in enumerate(rewards.names):
        out[f"reward/{name}"] = parts[:, column].mean().item()
        out[f"reward/{name}_std"] = parts[:, column].std().item()
    out["score_mean"] = scores.mean().item()
    out["score_std"] = scores.std().item()
    # Rounding apart (the gathered rows' product may sum in another order than each process's
    # own; under bf16 autocast the scores were summed in bf16), a score differs from its
    # weighted sum only where shaping acted.
    tolerance = max(1e-6, 2 * torch.finfo(scores.dtype).eps)
    raw = parts.float() @ weights.float()
    shaped = ~torch.isclose(scores.float(), raw, rtol=tolerance, atol=tolerance)
    out["score_shaped_share"] = shaped.float().mean().item()
    return out


SHAPED_SHARE_LIMIT = 0.2
"""Above this share of an iteration's scores changed by shaping, the trainer warns (once)."""


def shaping_settings(config: Any) -> list[str]:
    """The config's score-shaping settings that are on, as 'name=value' (PPO or GRPO config)."""
    on = []
    if not math.isnan(config.no_eos_penalty):
        on.append(f"no_eos_penalty={config.no_eos_penalty:g}")
    if config.score_clip > 0:
        on.append(f"score_clip={config.score_clip:g}")
    if getattr(config, "overlong_buffer", 0):
        on.append(f"overlong_buffer={config.overlong_buffer}")
    return on


class ShapingAlarm:
    """Warns once per run when shaping changed more than SHAPED_SHARE_LIMIT of an iteration's
    scores: RL then optimises mostly the shaping, not the rewards the user gave (a young model
    that rarely ends within max_new_tokens gets no_eos_penalty on nearly every response, and
    learns to stop early instead of raising the reward)."""

    def __init__(self, stage: str, config: Any, accelerator: Accelerator) -> None:
        self.stage, self.settings = stage, shaping_settings(config)
        self.speaks = accelerator.is_main_process
        self.raised = False

    def check(self, metrics: dict[str, Any]) -> None:
        share = metrics["score_shaped_share"]
        if self.raised or share <= SHAPED_SHARE_LIMIT:
            return
        self.raised = True
        if self.speaks:
            warnings.warn(
                f"{self.stage}: shaping ({', '.join(self.settings)}) changed "
                f"{share:.0%} of iteration {metrics['iteration']}'s scores (metric "
                "score_shaped_share): the score optimised is no longer the reward you gave "
                "(reward/<name> in the metrics). Turn the shaping off (no_eos_penalty nan, "
                "score_clip 0, overlong_buffer 0) unless it is meant. Shown once per run.",
                stacklevel=3,
            )


def sharded_sampling(config: SamplingConfig) -> bool:
    """Whether the policy stays sharded while it decodes (fsdp without sample_gathered)."""
    return config.fsdp and not config.sample_gathered


def all_processes(accelerator: Accelerator) -> Callable[[bool], bool]:
    """True on every process once it is True on every process (a collective)."""

    def decide(mine: bool) -> bool:
        if accelerator.num_processes == 1:
            return mine
        flags = accelerator.gather(torch.tensor([mine], device=accelerator.device))
        return bool(flags.all())

    return decide


def trainable_tensors(
    parts: dict[str, tuple[nn.Module, Sequence[nn.Parameter]]],
) -> dict[str, Tensor]:
    """{prefix.name: parameter} for the trained parameters of each named module: what a saved
    online run holds (the frozen base is the checkpoint the run started from)."""
    out = {}
    for prefix, (module, params) in parts.items():
        trained = {id(p) for p in params}
        out.update({f"{prefix}.{n}": p for n, p in module.named_parameters() if id(p) in trained})
    return out


class OnlineRun:
    """An online trainer's output folder and saved state.

    `prefix` names the files ("ppo": ppo_metrics.jsonl, ppo_state/...). A fresh run never
    appends to another run's files (refused unless overwrite, which deletes them); a resumed one
    (`load`) continues its own after dropping the lines logged past the saved iteration.
    """

    def __init__(
        self,
        prefix: str,
        files: Sequence[str],
        accelerator: Accelerator,
        out_dir: str | Path | None,
        overwrite: bool,
    ) -> None:
        self.prefix, self.files, self.accelerator = prefix, tuple(files), accelerator
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.overwrite, self.claimed = overwrite, False

    def claim(self) -> None:
        if self.claimed or self.out_dir is None:
            return
        claim_run_dir(self.out_dir, self.files, False, self.overwrite, self.accelerator)
        self.claimed = True

    def append(self, name: str, record: dict[str, Any]) -> None:
        """One JSONL line in out_dir/name, written by the main process."""
        if self.out_dir is not None and self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.out_dir / name, record)

    def save(
        self,
        directory: str | Path,
        config: Any,
        trainable: dict[str, Tensor],
        state: dict[str, Any],
        generators: dict[str, torch.Generator],
    ) -> None:
        """`run_state.save_rl_state` under this run's prefix. A collective."""
        save_rl_state(
            directory, self.prefix, self.accelerator, config, trainable, state, generators
        )

    def load(
        self,
        directory: str | Path,
        config: Any,
        trainable: dict[str, Tensor],
        generators: dict[str, torch.Generator],
    ) -> dict[str, Any]:
        """Restore tensors and RNG (`run_state.load_rl_state`), cut this run's JSONL files back
        to the saved iteration, and return the saved state for the trainer's own fields."""
        state = load_rl_state(
            directory, self.prefix, self.accelerator, config, trainable, generators
        )
        if self.out_dir is not None and self.accelerator.is_main_process:
            for name in self.files:
                truncate_metrics(self.out_dir / name, int(state["iteration"]), key="iteration")
        self.claimed = True  # a resumed run continues its own files
        return state


class OnlineTrainer(Protocol):
    """What `run_iterations` drives: PPOTrainer and GRPOTrainer."""

    accelerator: Accelerator
    iteration: int
    show_progress: bool

    def claim_run(self) -> None: ...

    def step(self) -> dict[str, Any]: ...

    def save(self, directory: str | Path) -> None: ...


def run_iterations(
    trainer: OnlineTrainer,
    num_iterations: int,
    time_limit_s: float = 0.0,
    checkpoint_every: int = 0,
    checkpoint_dir: str | Path | None = None,
    desc: str = "rl",
) -> list[dict[str, Any]]:
    """An online trainer's `train` (PPOTrainer, GRPOTrainer): check the arguments, claim the
    run directory (`trainer.claim_run()`), then `num_iterations` MORE `trainer.step()`s (after a
    `load`, counting from the resumed iteration; the CLI's --iterations is a total instead) with
    a progress bar of the score and KL, `trainer.save(checkpoint_dir)` every checkpoint_every
    iterations, and a stop once time_limit_s seconds have passed (0 = no limit; rank 0's clock
    decides for all ranks, since ranks that disagreed would hang in a collective). Returns this
    call's metrics."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    trainer.claim_run()
    accelerator = trainer.accelerator
    bar = tqdm(
        range(num_iterations),
        desc=desc,
        **progress_kwargs(trainer.show_progress and accelerator.is_main_process),
    )
    began, results = time.perf_counter(), []
    for _ in bar:
        metrics = trainer.step()
        results.append(metrics)
        bar.set_postfix(score=f"{metrics['score_mean']:.3f}", kl=f"{metrics['kl_ref']:.2f}")
        if checkpoint_every and trainer.iteration % checkpoint_every == 0:
            trainer.save(checkpoint_dir)
        if time_limit_s and rank0_decides(time.perf_counter() - began > time_limit_s, accelerator):
            break
    bar.close()
    return results
