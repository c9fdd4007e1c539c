"""`palm-rlhf chat`: a terminal conversation held in the KV cache between turns.

Each turn renders the whole conversation as text (through the model's chat template when its
tokenizer has one, else a plain "User: / Assistant:" transcript). The text extends what the
cache already holds, so only the new part (the end of the last turn, the user's message, the
markers of the assistant's turn) is tokenized and run through the model; the history never is
again, and the replies stay in the cache exactly as sampled. Replies stream as they are
decoded. Model output is untrusted text: control characters are shown escaped, never sent to
the terminal, so a reply cannot move the cursor or retitle the window.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from ..chat import COMMANDS, ChatSession, chat_loop
from ..model.palm import PaLM
from ..tokenizers.files import model_tokenizer


def add_chat_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="talk to a checkpoint in the terminal",
        description="An interactive chat with a checkpoint (an imported model, a PPO policy): "
        "replies stream as they are decoded, the conversation stays in the KV cache between "
        "turns, the model's chat template is applied when its tokenizer has one, and the "
        "oldest turns are dropped (with a notice) when the conversation outgrows max_seq_len. "
        + COMMANDS.replace("\n", " "),
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy [0.7]")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest reply [256, or half of max_seq_len if that is less]",
    )
    parser.add_argument(
        "--lora-scope",
        default=None,
        help="adapter scope to apply [the checkpoint's only one, if it has exactly one]",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default=None, help="torch device [cuda if available]")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights' dtype [auto: float32 on the CPU, where bf16 matmuls are slow; as stored "
        "on a GPU]",
    )
    parser.set_defaults(run=run_chat)


def run_chat(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes.get(args.dtype, torch.float32 if device.type == "cpu" else None)
    model = PaLM.from_pretrained(args.checkpoint, dtype=dtype).to(device)
    tokenizer = model_tokenizer(model, str(args.checkpoint))
    scope = args.lora_scope
    if scope is None and len(model.lora_configs) == 1:
        (scope,) = model.lora_configs
        print(f"(applying the checkpoint's adapter {scope!r}; --lora-scope picks another)")
    if scope is not None and scope not in model.lora_configs:
        raise ValueError(f"--lora-scope {scope!r}: the checkpoint has {sorted(model.lora_configs)}")
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens or min(256, model.config.max_seq_len // 2),
        lora_scope=scope,
        seed=args.seed,
    )
    with contextlib.suppress(ImportError):  # line editing and history, where available
        import readline  # noqa: F401
    chat_loop(session)
    sys.stdout.flush()
