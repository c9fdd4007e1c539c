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

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .generation import can_pack_weights, packed_weights, sample_next
from .model.palm import PaLM
from .tokenizers.base import Tokenizer, stop_ids

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
        logits = self.model(new, cache=self.cache, lora_scope=self.lora_scope, last_only=True)
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
