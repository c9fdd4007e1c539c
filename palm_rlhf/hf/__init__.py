"""Hugging Face interop: Cohere / Cohere2 checkpoints in and out, and their tokenizers.

The Cohere family (Command-R, Aya 23, Aya Expanse; Cohere2: Command R7B, tiny-aya) is
PaLM-shaped, so its weights map onto `PaLM` exactly: `import_hf` turns a downloaded directory
into a palm_rlhf checkpoint, `export_hf` turns a checkpoint (a fine-tuned policy, its LoRA
folded in) back into the directory transformers and vLLM serve. `HFTokenizer` reads the
tokenizer files such a checkpoint carries. Other architectures are refused by name.
"""

from ..tokenizers.hf import HFTokenizer, byte_tokenizer_files
from .config import hf_config_from_palm, palm_config_from_hf
from .convert import export_hf, import_hf

__all__ = [
    "HFTokenizer",
    "byte_tokenizer_files",
    "export_hf",
    "hf_config_from_palm",
    "import_hf",
    "palm_config_from_hf",
]
