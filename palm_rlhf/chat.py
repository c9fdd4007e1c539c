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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .generation import can_pack_weights, packed_weights, sample_next
from .palm import PaLM
from .tokenizer import Tokenizer, stop_ids

COMMANDS = """commands:
  /reset            forget the conversation (the system prompt stays)
  /system TEXT      set the system prompt and start over (/system alone removes it)
  /temperature T    sampling temperature, 0 for greedy
  /exit             leave (so does Ctrl-D)"""


class ChatSession:
    """One conversation with a model, its tokens kept in a KV cache.

    `prepare(message)` adds a user turn and feeds the model what is new; `respond(stream)`
    samples the reply, streaming text as it is decoded; `reply` does both. `logits` holds the
    next-token logits after everything fed so far: the tests compare it with a fresh forward
    of the whole conversation.
    """

    def __init__(
        self,
        model: PaLM,
        tokenizer: Tokenizer,
        system: str | None = None,
        temperature: float = 0.7,
        top_p: float | None = 0.95,
        top_k: int | None = None,
        max_new_tokens: int = 256,
        lora_scope: str | None = None,
        seed: int = 0,
        notify: Callable[[str], None] = print,
    ) -> None:
        if not model.config.causal:
            raise ValueError("chat needs a causal model (config.causal=True)")
        if max_new_tokens < 1 or max_new_tokens >= model.config.max_seq_len:
            raise ValueError(
                f"max_new_tokens must be in [1, max_seq_len={model.config.max_seq_len}), "
                f"got {max_new_tokens}"
            )
        self.model, self.tokenizer, self.notify = model.eval(), tokenizer, notify
        self.system, self.max_new_tokens, self.lora_scope = system, max_new_tokens, lora_scope
        self.set_temperature(temperature)
        self.top_p, self.top_k = top_p, top_k
        self.stops = set(stop_ids(tokenizer))
        device = model.token_emb.weight.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.template = getattr(tokenizer, "chat_template", None) is not None
        self.reset()

    # ----------------------------------------------------------------------------- state

    def reset(self) -> None:
        """Forget the conversation (not the system prompt)."""
        self.messages: list[dict[str, str]] = []
        self.cache = self.model.new_cache(1)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.cached_text = ""  # the conversation text those tokens spell
        self.logits: Tensor | None = None  # (1, v) after the last cached token

    def set_system(self, text: str | None) -> None:
        """A new system prompt starts a new conversation."""
        self.system = text or None
        self.reset()

    def set_temperature(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {value}")
        self.temperature = value

    # ----------------------------------------------------------------------------- layout

    def conversation_text(self, messages: list[dict[str, str]]) -> str:
        """`messages` (the system prompt first) as the model reads them, ending where the
        assistant's next turn begins: the chat template's rendering, or a plain transcript
        for a model without one (the byte tokenizer, a model of our own)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        if self.template:
            return self.tokenizer.render_chat([*system, *messages], add_generation_prompt=True)
        parts = [f"{self.system}\n\n"] if self.system else []
        for message in messages:
            speaker = "User" if message["role"] == "user" else "Assistant"
            ending = "\n" if message["role"] == "user" else "\n\n"
            parts.append(f"{speaker}: {message['content']}{ending}")
        return "".join(parts) + "Assistant:"

    def _encode(self, text: str, start: bool) -> list[int]:
        """Conversation text -> ids: a template writes its own bos and turn markers (as text
        that becomes their special ids); a transcript starts with bos."""
        if self.template:
            return self.tokenizer.encode_chat(text)
        return self.tokenizer.encode(text, add_bos=start)

    def _conversation_ids(self) -> tuple[str, list[int]]:
        """The conversation's text and ids. When the text extends what the cache holds (the
        usual case: the last reply followed by a new user turn), the ids are the cached ones
        (the reply exactly as sampled) plus the new text's: only the new text is tokenized and
        read. Otherwise (the history changed) the whole text is tokenized afresh."""
        text = self.conversation_text(self.messages)
        if self.cached and text.startswith(self.cached_text):
            return text, self.cached + self._encode(text[len(self.cached_text) :], start=False)
        return text, self._encode(text, start=True)

    def _fitted_conversation(self) -> tuple[str, list[int]]:
        """`_conversation_ids` after dropping the oldest exchanges until it leaves room for a
        reply of max_new_tokens within max_seq_len."""
        limit = self.model.config.max_seq_len - self.max_new_tokens
        alone = len(self._encode(self.conversation_text(self.messages[-1:]), start=True))
        if alone > limit:  # refused before any history is given up for it
            self.messages.pop()
            raise ValueError(
                f"that message is too long: {alone} tokens, and a reply needs "
                f"{self.max_new_tokens} more within the model's {limit + self.max_new_tokens}"
            )
        dropped = 0
        while True:
            text, ids = self._conversation_ids()
            if len(ids) <= limit:
                break
            # The oldest exchange goes: a user turn and the reply to it (a turn left without
            # one, after an interrupted reply, goes alone); the newest message always stays.
            replied = self.messages[1]["role"] == "assistant" and len(self.messages) > 2
            self.messages = self.messages[2 if replied else 1 :]
            dropped += 1
        if dropped:
            self.notify(
                f"(the conversation outgrew the model's {self.model.config.max_seq_len} tokens: "
                f"dropped the oldest {dropped} exchange{'s' * (dropped > 1)})"
            )
        return text, ids

    # ----------------------------------------------------------------------------- model

    @torch.no_grad()
    def _feed(self, ids: list[int]) -> int:
        """Bring the cache to `ids`: keep the longest prefix it already holds, run the model on
        the rest only, and keep the last logits. Returns how many tokens the model read."""
        keep = 0
        for old, new in zip(self.cached, ids, strict=False):
            if old != new:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # at least one token runs, to give the next logits
        self.cache.truncate(keep)
        device = self.model.token_emb.weight.device
        new = torch.tensor([ids[keep:]], device=device)
        logits = self.model(new, cache=self.cache, lora_scope=self.lora_scope)
        self.logits, self.cached = logits[:, -1], list(ids)
        return len(ids) - keep

    @torch.no_grad()
    def _append(self, token: int) -> None:
        """Feed one sampled token (a decoding step)."""
        new = torch.tensor([[token]], device=self.model.token_emb.weight.device)
        logits = self.model(new, cache=self.cache, lora_scope=self.lora_scope, validate_ids=False)
        self.logits = logits[:, -1]
        self.cached.append(token)

    def prepare(self, message: str) -> int:
        """Add a user turn and feed the model what is new; returns how many tokens it read."""
        self.messages.append({"role": "user", "content": message})
        text, ids = self._fitted_conversation()
        read = self._feed(ids)
        self.cached_text = text
        return read

    @torch.no_grad()
    def respond(self, stream: Callable[[str], None] = lambda text: None) -> str:
        """Sample the assistant's turn token by token, calling `stream` with each new piece of
        text; stop at a stop id or max_new_tokens. The reply joins the conversation."""
        if self.logits is None:
            raise ValueError("respond() needs a prepared user turn first")
        rows = 1
        packing = can_pack_weights(self.model)
        reply: list[int] = []
        shown = ""
        with (
            packed_weights(self.model, rows, self.lora_scope)
            if packing
            else contextlib.nullcontext()
        ):
            for _ in range(self.max_new_tokens):
                token, _ = sample_next(
                    self.logits, self.temperature, self.top_k, self.top_p, self.generator
                )
                if int(token) in self.stops:
                    break
                reply.append(int(token))
                text = self.tokenizer.decode(reply)
                # Hold back a character still being spelled out in bytes (decoded as U+FFFD).
                if text.startswith(shown) and not text.endswith("\ufffd"):
                    stream(text[len(shown) :])
                    shown = text
                self._append(int(token))
        text = self.tokenizer.decode(reply)
        if text.startswith(shown) and len(text) > len(shown):
            stream(text[len(shown) :])
        self.messages.append({"role": "assistant", "content": text})
        self.cached_text += text  # the cache now holds the reply's tokens (not its stop id)
        return text

    def reply(self, message: str, stream: Callable[[str], None] = lambda text: None) -> str:
        self.prepare(message)
        return self.respond(stream)


def printable(text: str) -> str:
    """Model text made safe for a terminal: C0/C1 control characters (escape sequences that
    could move the cursor, clear the screen or retitle the window) shown as \\xNN; newlines
    and tabs kept."""
    return "".join(
        ch
        if ch in "\n\t" or not (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0)
        else f"\\x{ord(ch):02x}"
        for ch in text
    )


def chat_loop(
    session: ChatSession,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda text: print(text, end="", flush=True),
) -> None:
    """Read lines, answer them, handle the /commands, until /exit or end of input."""
    write("palm-rlhf chat: type a message, /help for commands, /exit to leave\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if handle_command(session, line, write):
                return
            continue
        try:
            session.prepare(line)
        except ValueError as error:
            write(f"({error})\n")
            continue
        write("assistant> ")
        session.respond(lambda piece: write(printable(piece)))
        write("\n")


def handle_command(session: ChatSession, line: str, write: Callable[[str], None]) -> bool:
    """Carry out one /command; True means leave."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit"):
        return True
    if command == "/reset":
        session.reset()
        write("(conversation cleared)\n")
    elif command == "/system":
        session.set_system(argument)
        write(f"(system prompt {'set' if argument else 'removed'}; conversation cleared)\n")
    elif command == "/temperature":
        try:
            session.set_temperature(float(argument))
            write(f"(temperature {session.temperature:g})\n")
        except ValueError:
            write(f"(temperature must be a number >= 0, got {argument!r})\n")
    elif command == "/help":
        write(COMMANDS + "\n")
    else:
        write(f"(unknown command {command}; /help lists them)\n")
    return False


# ----------------------------------------------------------------------------- command line


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
    from .tokenizer import model_tokenizer

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
