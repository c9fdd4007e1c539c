import csv
import importlib.util
import struct
import sys

import pytest

import palm_rlhf.plot
from palm_rlhf.plot import ppo_figure, write_ppo_curves


def ppo_history():
    # Shaped like PPOTrainer.history: beta adapts, KL climbs towards the target.
    history = [
        {
            "iteration": i + 1,
            "score_mean": -0.5 + 0.3 * i,
            "kl_ref": 0.1 + 0.7 * i,
            "kl_coef": 0.1 * 1.05**i,
            "response_len": 16.0 - i,
            "eos_rate": 0.25 * i,
        }
        for i in range(4)
    ]
    history[0]["rule_score"] = 0.5  # in one record only: not a curve, must stay out of the CSV
    history[1]["note"] = "warmup"  # not a number
    return history


def png_size(data):
    """Width and height from the IHDR chunk, which the PNG spec puts first after the magic."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_png_is_800x600_and_does_not_touch_pyplot(tmp_path):
    # Catches: a broken or empty PNG, a size other than the 8x6 in / 100 dpi promised (e.g.
    # bbox_inches="tight" or the user's savefig.dpi leaking in), and drawing through pyplot,
    # which would register global figures and pick a backend for the user's program.
    pyplot_was_loaded = "matplotlib.pyplot" in sys.modules
    paths = write_ppo_curves(ppo_history(), tmp_path / "run", kl_target=2.0)
    assert paths["png"] == str(tmp_path / "run" / "ppo_curves.png")
    assert "message" not in paths
    assert png_size((tmp_path / "run" / "ppo_curves.png").read_bytes()) == (800, 600)
    if not pyplot_was_loaded:
        assert "matplotlib.pyplot" not in sys.modules


def test_figure_has_labelled_axes_legends_and_the_history_data():
    # Catches: a missing or wrong axis label/title, a KL target or beta curve left out of the
    # legends, and plotting the wrong metric on a panel (e.g. score and KL swapped).
    history = ppo_history()
    fig = ppo_figure(history, kl_target=2.0, title="PPO demo")
    score_ax, kl_ax, beta_ax = fig.axes
    assert fig.get_suptitle() == "PPO demo"
    assert score_ax.get_ylabel() == "mean reward-model score (normalised)"
    assert score_ax.get_title() == "Reward-model score of each rollout"
    assert kl_ax.get_xlabel() == "PPO iteration"
    assert kl_ax.get_ylabel() == "KL to reference (nats / response)"
    assert "KL" in kl_ax.get_title()
    assert beta_ax.get_ylabel() == "KL coefficient β"

    def line(ax, label):
        (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
        return list(found.get_xdata()), list(found.get_ydata())

    xs = [h["iteration"] for h in history]
    assert line(score_ax, "mean score") == (xs, [h["score_mean"] for h in history])
    assert line(kl_ax, "KL to reference") == (xs, [h["kl_ref"] for h in history])
    assert line(beta_ax, "KL coefficient β") == (xs, [h["kl_coef"] for h in history])
    assert set(line(kl_ax, "KL target = 2")[1]) == {2.0}

    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    texts = [t.get_text() for legend in legends for t in legend.get_texts()]
    assert "mean score" in texts and "KL coefficient β" in texts
    assert "KL target = 2" in texts
    # The last value of each curve is written on the plot.
    notes = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert {f"{history[-1][k]:.3g}" for k in ("score_mean", "kl_ref", "kl_coef")} <= notes

    # Without a target, no target line and no legend entry for one.
    fig = ppo_figure(history)
    texts = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]
    assert not any("KL target" in t for t in texts)


def test_csv_round_trips_the_history(tmp_path):
    # Catches: a header in an unstable or wrong order, a key kept that is not in every record
    # (or not a number), and values rounded on the way out (e.g. formatted with %.3f).
    history = ppo_history()
    paths = write_ppo_curves(history, tmp_path)
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    assert header == [
        "iteration",
        "score_mean",
        "kl_ref",
        "kl_coef",
        "eos_rate",
        "response_len",
    ]
    assert len(rows) == 1 + len(history)
    for row, record in zip(rows[1:], history, strict=True):
        assert int(row[0]) == record["iteration"]
        assert [float(v) for v in row[1:]] == [record[k] for k in header[1:]]


def test_without_matplotlib_the_csv_is_still_written(tmp_path, monkeypatch):
    # Catches: a top-level matplotlib import (palm_rlhf.plot would not import without it), an
    # ImportError escaping to the caller, no CSV, and a message not saying how to install it.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)
    # A fresh copy of the module, imported while matplotlib is blocked (the one under test was
    # imported with it installed, so its top-level imports have already run).
    spec = importlib.util.spec_from_file_location(
        "palm_rlhf._plot_without_matplotlib", palm_rlhf.plot.__file__
    )
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    paths = plot.write_ppo_curves(ppo_history(), tmp_path)
    assert paths["png"] is None
    assert not (tmp_path / "ppo_curves.png").exists()
    assert (tmp_path / "ppo_curves.csv").read_text().startswith("iteration,score_mean,kl_ref")
    assert "pip install 'palm-rlhf[plot]'" in paths["message"]
    assert "pip install matplotlib" in paths["message"]
    assert paths["csv"] in paths["message"]


def test_empty_history_and_missing_key_are_clear_errors(tmp_path):
    # Catches: an empty history reaching matplotlib (an opaque error or a blank plot), a
    # missing metric surfacing as a bare KeyError, and a half-written output directory.
    with pytest.raises(ValueError, match="no PPO iterations to plot"):
        write_ppo_curves([], tmp_path)
    history = ppo_history()
    del history[2]["kl_ref"]
    with pytest.raises(ValueError, match=r"history\[2\].*'kl_ref'"):
        write_ppo_curves(history, tmp_path)
    history = ppo_history()
    history[1]["score_mean"] = "high"
    with pytest.raises(ValueError, match=r"history\[1\].*'score_mean'.*not a number"):
        write_ppo_curves(history, tmp_path)
    assert list(tmp_path.iterdir()) == []
