import json
import struct
import zlib

import pytest

from palm_rlhf.cli import main
from palm_rlhf.plot import line_chart_png


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    rows = [raw[y * (width * 3 + 1) + 1 : (y + 1) * (width * 3 + 1)] for y in range(height)]
    return width, height, rows


def test_line_chart_is_a_valid_png_with_the_curves(tmp_path):
    line_chart_png(
        [[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]], tmp_path / "c.png", width=100, panel_height=50
    )
    width, height, rows = read_png(tmp_path / "c.png")
    assert (width, height) == (100, 100)
    colored = sum(
        1 for row in rows for i in range(0, len(row), 3) if row[i : i + 3] == bytes((31, 119, 180))
    )
    assert colored > 50  # the first series' line was drawn
    with pytest.raises(ValueError, match="non-empty"):
        line_chart_png([[]], tmp_path / "d.png")


def test_smoke_demo_runs_the_whole_pipeline(tmp_path, capsys):
    assert main(["demo", "--smoke", "--out", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for key in (
        "pretrain_eval_bpb",
        "reward_model_heldout_accuracy",
        "rule_score_before",
        "rule_score_after",
        "heldout_kl_to_reference",
        "samples",
    ):
        assert key in summary
    assert 0 <= summary["rule_score_before"] <= 1 and 0 <= summary["rule_score_after"] <= 1
    assert summary["ranked_groups"] >= 2
    read_png(tmp_path / "demo" / "ppo_curves.png")
    lines = (tmp_path / "demo" / "ppo_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per PPO iteration
    assert "rule score before -> after PPO" in capsys.readouterr().out
