"""palm_rlhf: PaLM + RLHF in PyTorch."""

from .config import LoRAConfig, PaLMConfig
from .generation import GenerationOutput, generate
from .kv_cache import KVCache
from .lora import add_lora, lora_parameters, merge_lora, remove_lora
from .palm import PaLM, lm_loss
from .tokenizer import ByteTokenizer, Tokenizer, pad_sequences

__all__ = [
    "ByteTokenizer",
    "GenerationOutput",
    "KVCache",
    "LoRAConfig",
    "PaLM",
    "PaLMConfig",
    "Tokenizer",
    "add_lora",
    "generate",
    "lm_loss",
    "lora_parameters",
    "merge_lora",
    "pad_sequences",
    "remove_lora",
]

__version__ = "0.1.0"
