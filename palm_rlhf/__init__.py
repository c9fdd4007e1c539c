"""palm_rlhf: PaLM + RLHF in PyTorch."""

from .config import LoRAConfig, PaLMConfig, PPOConfig, TrainConfig
from .generation import GenerationOutput, generate
from .hf import HFTokenizer, export_hf, import_hf
from .kv_cache import KVCache
from .lora import add_lora, lora_parameters, merge_lora, remove_lora
from .palm import PaLM, lm_loss
from .reward import RewardConfig, RewardModel, pairwise_loss, ranking_loss
from .rl.configs import DPOConfig, GRPOConfig
from .rl.dpo import train_dpo
from .rl.grpo import GRPOTrainer
from .rl.ppo import PPOTrainer
from .tokenizer import ByteTokenizer, Tokenizer, pad_sequences
from .train_lm import train_lm
from .train_reward import train_reward

__all__ = [
    "ByteTokenizer",
    "DPOConfig",
    "GRPOConfig",
    "GRPOTrainer",
    "GenerationOutput",
    "HFTokenizer",
    "KVCache",
    "LoRAConfig",
    "PaLM",
    "PaLMConfig",
    "PPOConfig",
    "PPOTrainer",
    "RewardConfig",
    "RewardModel",
    "Tokenizer",
    "TrainConfig",
    "add_lora",
    "export_hf",
    "generate",
    "import_hf",
    "lm_loss",
    "lora_parameters",
    "merge_lora",
    "pad_sequences",
    "pairwise_loss",
    "ranking_loss",
    "remove_lora",
    "train_dpo",
    "train_lm",
    "train_reward",
]

__version__ = "0.1.0"
