import subprocess
import sys

import pytest
import torch

from palm_rlhf import ByteTokenizer, PaLM, PaLMConfig
from palm_rlhf.cli import main


def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-p"):
        assert option in help_text


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "palm_rlhf.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "generate" in result.stdout


def test_generate_from_checkpoint(tmp_path, capsys):
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = PaLM(
        PaLMConfig(num_tokens=tok.vocab_size, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64)
    )
    model.save_pretrained(tmp_path / "ckpt")
    code = main(
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--prompt",
            "def ",
            "--prompt",
            "x = ",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ]
    )
    assert code == 0
    blocks = capsys.readouterr().out.split("-" * 40 + "\n")
    assert blocks[0].startswith("def ") and blocks[1].startswith("x = ")


def test_generate_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "a"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    model = PaLM(PaLMConfig(num_tokens=40, dim=16, depth=1, heads=2, dim_head=8, max_seq_len=32))
    model.save_pretrained(tmp_path / "small")
    assert main(["generate", "--checkpoint", str(tmp_path / "small"), "--prompt", "a"]) == 2
    assert "byte tokenizer needs 259" in capsys.readouterr().err
