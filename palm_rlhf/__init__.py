"""palm_rlhf: PaLM + RLHF in PyTorch. The names users import, stable however the modules below
are arranged: the model and its config, generation, tokenizers, the losses, the trainers and
their configs, and the Hugging Face conversion."""

from .config import LoRAConfig, PaLMConfig
from .generation import GenerationOutput, generate
from .hf import HFTokenizer, export_hf, import_hf
from .losses.lm import lm_loss
from .losses.preference import pairwise_loss, ranking_loss
from .model.kv_cache import KVCache
from .model.lora import add_lora, lora_parameters, merge_lora, remove_lora
from .model.palm import PaLM
from .model.reward import RewardConfig, RewardModel
from .rl.config import GRPOConfig, PPOConfig
from .rl.grpo import GRPOTrainer
from .rl.ppo import PPOTrainer
from .tokenizers.base import ByteTokenizer, Tokenizer, encode_prompt, pad_sequences
from .training.config import DPOConfig, TrainConfig
from .training.dpo import train_dpo
from .training.lm import train_lm
from .training.reward import train_reward

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
    "encode_prompt",
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
