"""`palm-rlhf chat`: the conversation lives in the KV cache (its logits equal a fresh forward of
the whole conversation, and the model reads only what is new), the chat template is applied,
the oldest turns go when the context is full, commands work, and a real terminal session in
tmux shows two turns."""

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch
from bpe import VOCAB, tokenizer_files
from conftest import assert_close_f32

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.chat import ChatSession, chat_loop, printable
from palm_rlhf.hf import HFTokenizer


def bpe_model(max_seq_len: int = 256, seed: int = 0) -> PaLM:
    """A random PaLM with Cohere2's sliding-window layout and the tiny BPE (with a template)."""
    torch.manual_seed(seed)
    config = PaLMConfig(
        num_tokens=VOCAB, dim=32, depth=2, heads=4, kv_heads=2, dim_head=8,
        max_seq_len=max_seq_len, layer_types=("sliding", "full"), sliding_window=16,
        rotary_layers=(True, False),
    )  # fmt: skip
    model = PaLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.3)
    model.tokenizer_files = tokenizer_files()
    return model.eval()


def fresh_logits(session: ChatSession) -> torch.Tensor:
    ids = torch.tensor([session.cached])
    with torch.no_grad():
        return session.model(ids)[:, -1]


def test_the_cache_carries_the_conversation(monkeypatch):
    model = bpe_model()
    session = ChatSession(model, HFTokenizer(tokenizer_files()), system="Be brief.",
                          temperature=0.0, max_new_tokens=12)  # fmt: skip
    read = []
    real_forward = PaLM.forward

    def counting(self, tokens, *args, **kwargs):
        read.append(tokens.shape[1])
        return real_forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(PaLM, "forward", counting)
    first = session.reply("def wrap(text):")
    read.clear()
    second = session.reply("and shlex?")
    assert session.messages == [
        {"role": "user", "content": "def wrap(text):"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and shlex?"},
        {"role": "assistant", "content": second},
    ]
    # The second turn ran the model on its new tokens and one token per reply step, not on
    # the first turn again.
    history = len(session.cached) - len(read)  # everything before the second turn's replies
    assert read[0] < history / 3
    assert all(n == 1 for n in read[1:])
    read.clear()
    session.prepare("one more")
    assert sum(read) < len(session.cached) / 2
    assert_close_f32(session.logits, fresh_logits(session))
    # The cached tokens spell the template's rendering of the whole conversation (the
    # replies as sampled, which need not be how the tokenizer would split their text).
    tokenizer = session.tokenizer
    system = [{"role": "system", "content": "Be brief."}]
    rendered = tokenizer.render_chat([*system, *session.messages], add_generation_prompt=True)
    assert session.cached_text == rendered
    special = tokenizer.backend.decode(session.cached, skip_special_tokens=False)
    assert special == rendered and session.cached[0] == tokenizer.bos_id


def test_a_model_without_template_gets_a_plain_transcript():
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=259, dim=16, depth=1, heads=2, dim_head=8, max_seq_len=256))
    session = ChatSession(model, ByteTokenizer(), temperature=0.0, max_new_tokens=5)
    reply = session.reply("hi")
    session.prepare("bye")
    assert session.cached[0] == ByteTokenizer().bos_id
    text = ByteTokenizer().decode(session.cached)
    assert text == f"User: hi\nAssistant: {reply}\n\nUser: bye\nAssistant:"
    assert_close_f32(session.logits, fresh_logits(session))


def test_the_oldest_turns_go_when_the_context_is_full():
    notices = []
    model = bpe_model(max_seq_len=96)
    session = ChatSession(model, HFTokenizer(tokenizer_files()), temperature=0.0,
                          max_new_tokens=16, notify=notices.append)  # fmt: skip
    for turn in range(6):
        session.reply(f"turn {turn}: def wrap(text, width=70, **kwargs):")
        assert len(session.cached) + 16 <= 96 + 16  # never past max_seq_len
    assert notices and "dropped the oldest" in notices[0] and "96 tokens" in notices[0]
    assert session.messages[0]["content"] != "turn 0: def wrap(text, width=70, **kwargs):"
    assert session.messages[-2]["content"].startswith("turn 5")
    session.prepare("last")
    assert_close_f32(session.logits, fresh_logits(session))
    kept = list(session.messages)
    with pytest.raises(ValueError, match="that message is too long"):
        session.prepare("x " * 200)
    assert session.messages == kept  # neither the refused message nor any history is lost


def test_a_stop_id_ends_the_reply():
    model = bpe_model()
    tokenizer = HFTokenizer(tokenizer_files())
    session = ChatSession(model, tokenizer, temperature=0.0, max_new_tokens=8)
    session.prepare("hello")
    first = int(session.logits.argmax())
    tokenizer.stop_ids = (tokenizer.eos_id, first)  # the token greedy decoding picks first
    session = ChatSession(model, tokenizer, temperature=0.0, max_new_tokens=8)
    assert session.reply("hello") == ""
    assert session.cached[-1] != first  # a stop token is not fed back


def test_commands_and_untrusted_output():
    model = bpe_model()
    session = ChatSession(model, HFTokenizer(tokenizer_files()), temperature=0.5,
                          max_new_tokens=4)  # fmt: skip
    lines = iter(["hello", "/temperature 0", "/temperature hot", "/system Talk like a pirate",
                  "/bogus", "ahoy", "/reset", "/help", "/exit", "never read"])  # fmt: skip
    out = []
    chat_loop(session, read=lambda prompt: next(lines), write=out.append)
    text = "".join(out)
    assert session.temperature == 0.0 and session.system == "Talk like a pirate"
    assert "(temperature 0)" in text and "temperature must be a number" in text
    assert "system prompt set; conversation cleared" in text and "unknown command /bogus" in text
    assert text.count("assistant> ") == 2 and "(conversation cleared)" in text
    assert session.messages == [] and "/temperature T" in text
    assert printable("ok\x1b[2J\x1b]0;owned\x07\tend\n\x9b") == (
        "ok\\x1b[2J\\x1b]0;owned\\x07\tend\n\\x9b"
    )


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        if os.environ.get("PALM_RLHF_REQUIRE_TMUX"):
            pytest.fail("tmux is required here (PALM_RLHF_REQUIRE_TMUX) but not installed")
        pytest.skip("tmux not installed (.ci/run installs it)")
    name = f"palm-rlhf-chat-{os.getpid()}"
    yield name
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True, check=False)


def screen(session: str) -> str:
    done = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout


def wait_for(session: str, condition, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = screen(session)
        if condition(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"the screen never showed what was expected:\n{screen(session)}")


def test_two_turns_in_a_real_terminal(tmp_path, tmux):
    bpe_model().save_pretrained(tmp_path / "ckpt")
    command = [sys.executable, "-m", "palm_rlhf.cli", "chat", str(tmp_path / "ckpt"),
               "--temperature", "0", "--max-new-tokens", "6", "--system", "Be brief."]  # fmt: skip
    subprocess.run(["tmux", "new-session", "-d", "-s", tmux, "-x", "120", "-y", "40",
                    shlex.join(command)], check=True)  # fmt: skip
    # capture-pane drops trailing spaces: an empty prompt shows as "you>".
    wait_for(tmux, lambda text: "you>" in text)
    subprocess.run(["tmux", "send-keys", "-t", tmux, "def wrap(text):", "Enter"], check=True)
    wait_for(tmux, lambda text: text.count("you>") == 2)
    subprocess.run(["tmux", "send-keys", "-t", tmux, "and shlex?", "Enter"], check=True)
    text = wait_for(tmux, lambda text: text.count("you>") == 3)
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].startswith("palm-rlhf chat")
    assert "you> def wrap(text):" in lines and "you> and shlex?" in lines
    assert sum(line.startswith("assistant> ") for line in lines) == 2
    # The same conversation in-process, greedy: the terminal showed exactly these replies.
    session = ChatSession(PaLM.from_pretrained(tmp_path / "ckpt"), HFTokenizer(tokenizer_files()),
                          system="Be brief.", temperature=0.0, max_new_tokens=6)  # fmt: skip
    first, second = session.reply("def wrap(text):"), session.reply("and shlex?")

    def words(text):  # a reply may hold newlines, and blank lines were left out above
        return " ".join(text.split())

    shown = words(text)
    assert words(f"you> def wrap(text): assistant> {printable(first)} you> and shlex?") in shown
    assert words(f"you> and shlex? assistant> {printable(second)} you>") in shown
    subprocess.run(["tmux", "send-keys", "-t", tmux, "/exit", "Enter"], check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = subprocess.run(["tmux", "has-session", "-t", tmux], capture_output=True)
        if alive.returncode != 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("chat did not exit on /exit")
