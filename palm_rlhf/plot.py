"""PPO training curves: the per-iteration history as a CSV and, with matplotlib, a PNG.

This module owns how a PPO run is drawn: `ppo_figure` builds the figure (reward-model score on
top; KL to the reference policy below, with the KL coefficient beta on a right-hand axis and
the KL target when there is one) and `write_ppo_curves` writes `ppo_curves.csv` and
`ppo_curves.png` into a run directory. matplotlib is optional (`pip install 'palm-rlhf[plot]'`):
it is imported only here, inside the functions, and without pyplot, so drawing a plot neither
needs a display nor switches the backend of a program that imported palm_rlhf. Without it the
CSV is still written, so no run loses its curves.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .storage.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REQUIRED_KEYS = ("iteration", "score_mean", "kl_ref", "kl_coef")
CSV_NAME = "ppo_curves.csv"
PNG_NAME = "ppo_curves.png"
FIGSIZE_INCHES = (8.0, 6.0)
DPI = 100  # with FIGSIZE_INCHES: an 800 x 600 PNG, the size the tests check
INSTALL_HINT = "`pip install 'palm-rlhf[plot]'` (or `pip install matplotlib`)"


def _is_number(value: object) -> bool:
    # bool is an int subclass, but True/False is a flag, not a curve.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_history(history: Sequence[Mapping[str, float]]) -> None:
    if len(history) == 0:
        raise ValueError("PPO history is empty: no PPO iterations to plot")
    for index, record in enumerate(history):
        for key in REQUIRED_KEYS:
            if key not in record:
                raise ValueError(
                    f"PPO history[{index}] (iteration {record.get('iteration', '?')}) is "
                    f"missing {key!r}; every record needs {list(REQUIRED_KEYS)}"
                )
            if not _is_number(record[key]):
                raise ValueError(
                    f"PPO history[{index}] (iteration {record.get('iteration', '?')}): "
                    f"{key!r} is {record[key]!r}, not a number"
                )


def curve_columns(history: Sequence[Mapping[str, float]]) -> list[str]:
    """The CSV columns: the required keys first, then every other key that is a number in every
    record, sorted so that the same metrics always give the same header."""
    _check_history(history)
    shared = set(history[0]).intersection(*history[1:])
    extra = sorted(
        key
        for key in shared - set(REQUIRED_KEYS)
        if all(_is_number(record[key]) for record in history)
    )
    return [*REQUIRED_KEYS, *extra]


def _csv_bytes(history: Sequence[Mapping[str, float]]) -> bytes:
    columns = curve_columns(history)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    # csv writes floats with repr, so reading a value back with float() gives the same number.
    writer.writerows([record[key] for key in columns] for record in history)
    return text.getvalue().encode("utf-8")


def _annotate_last(
    axes: Axes, xs: list[float], ys: list[float], color: str, below: bool = False
) -> None:
    """Write the final value beside the last point: the number a reader looks for first.

    Right-aligned so the text stays inside the axes at the right edge; `below` puts it under
    the point, for a curve sharing a panel (KL and beta often end at the same corner)."""
    finite = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    if not finite:
        return
    x, y = finite[-1]
    axes.annotate(
        f"{y:.3g}",
        xy=(x, y),
        xytext=(-6, -14 if below else 6),
        textcoords="offset points",
        ha="right",
        color=color,
        fontsize=9,
        # A backing box keeps the number legible where it crosses another curve or the grid.
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
    )


def ppo_figure(
    history: Sequence[Mapping[str, float]],
    kl_target: float | None = None,
    title: str = "PPO",
    stage: str = "ppo",
) -> Figure:
    """Build (but do not save) the two-panel PPO figure, 8 x 6 inches at 100 dpi.

    Top: mean reward-model score of each rollout. Bottom: KL to the reference policy (nats per
    response), the KL target as a dashed horizontal line when given, and the KL coefficient
    beta of each iteration as a dashed line on a right-hand axis: with an adaptive controller,
    beta moving is what explains the KL curve moving. Raises ImportError without matplotlib.
    """
    _check_history(history)
    # Figure, not pyplot: a Figure made directly is never registered with pyplot's global
    # state and renders PNG through Agg whatever the user's interactive backend is.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    iterations = [float(record["iteration"]) for record in history]
    scores = [float(record["score_mean"]) for record in history]
    kls = [float(record["kl_ref"]) for record in history]
    betas = [float(record["kl_coef"]) for record in history]

    fig = Figure(figsize=FIGSIZE_INCHES, dpi=DPI, layout="constrained")
    score_ax, kl_ax = fig.subplots(2, 1, sharex=True)
    fig.suptitle(title)
    if len(iterations) == 1:
        # One point gives matplotlib a zero-width x range, which it ticks in fractions.
        score_ax.set_xlim(iterations[0] - 1, iterations[0] + 1)

    # Markers as well as lines: a run of one iteration is a single point, invisible as a line.
    score_ax.plot(iterations, scores, "o-", color="tab:blue", ms=3, label="mean score")
    _annotate_last(score_ax, iterations, scores, "tab:blue")
    if stage == "ppo":
        score_ax.set_title("Reward-model score of each rollout")
        score_ax.set_ylabel("mean reward-model score (normalised)")
    else:  # critic-free trainers may score with functions, a reward model or both
        score_ax.set_title("Score of each rollout (weighted sum of the rewards)")
        score_ax.set_ylabel("mean score")
    score_ax.legend(loc="best")

    kl_ax.plot(iterations, kls, "o-", color="tab:red", ms=3, label="KL to reference")
    _annotate_last(kl_ax, iterations, kls, "tab:red")
    if kl_target is not None:
        kl_ax.axhline(
            kl_target, color="tab:gray", ls="--", lw=1, label=f"KL target = {kl_target:g}"
        )
    kl_ax.set_title("KL to the reference policy, and the KL coefficient β")
    kl_ax.set_ylabel("KL to reference (nats / response)")
    kl_ax.set_xlabel(f"{stage.upper()} iteration")

    # beta lives on its own scale (0.01..1) while KL is in nats (0..tens): a shared y axis
    # would flatten one of them.
    beta_ax = kl_ax.twinx()
    # Dashed and unmarked so it does not read as a second KL curve; a lone point needs a marker.
    beta_style = ".--" if len(betas) == 1 else "--"
    beta_ax.plot(iterations, betas, beta_style, color="tab:green", label="KL coefficient β")
    _annotate_last(beta_ax, iterations, betas, "tab:green", below=True)
    beta_ax.set_ylabel("KL coefficient β")
    # One legend for both y axes, on the twin: the twin is painted after kl_ax, so a legend
    # on kl_ax would have the beta curve drawn over it.
    handles = kl_ax.get_legend_handles_labels()[0] + beta_ax.get_legend_handles_labels()[0]
    beta_ax.legend(handles=handles, loc="best")

    for ax in (score_ax, kl_ax, beta_ax):
        # Headroom so the final-value labels and the legend do not sit on the curves' ends.
        ax.margins(y=0.12)
    for ax in (score_ax, kl_ax):
        ax.grid(True, alpha=0.3)
        # Iterations are whole numbers; matplotlib would otherwise tick 0.5, 1.5, ...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        # sharex hides the top panel's tick labels; keep them so each panel reads alone.
        ax.tick_params(labelbottom=True)
    return fig


def write_ppo_curves(
    history: Sequence[Mapping[str, float]],
    out_dir: str | Path,
    kl_target: float | None = None,
    title: str = "PPO",
    stage: str = "ppo",
) -> dict[str, str | None]:
    """Write `out_dir/ppo_curves.csv` always and `out_dir/ppo_curves.png` when matplotlib is
    installed, both atomically (stage="grpo": grpo_curves.csv/.png, for GRPOTrainer's history,
    which has the same required keys).

    `history` is PPO's per-iteration metrics (`PPOTrainer.history`): each record needs
    "iteration", "score_mean", "kl_ref" and "kl_coef"; other numeric keys present in every
    record ("response_len", "eos_rate", ...) become extra CSV columns.

    Returns {"csv": path, "png": path or None}; without matplotlib also a "message" saying how
    to install it. Raises ValueError for an empty history or a record missing a required key.
    """
    _check_history(history)  # before writing anything: a bad history leaves no half output
    out_dir = Path(out_dir)
    csv_path = out_dir / CSV_NAME.replace("ppo", stage)
    png_path = out_dir / PNG_NAME.replace("ppo", stage)
    write_bytes_atomic(csv_path, _csv_bytes(history))
    try:
        import matplotlib  # noqa: F401  (only to learn whether it is installed)
    except ImportError:
        return {
            "csv": str(csv_path),
            "png": None,
            "message": (
                f"matplotlib is not installed: {INSTALL_HINT} to get {png_path.name}; "
                f"the curve data is in {csv_path}"
            ),
        }
    fig = ppo_figure(history, kl_target=kl_target, title=title, stage=stage)
    buffer = io.BytesIO()
    # dpi given again: savefig would otherwise use the user's rcParams["savefig.dpi"].
    fig.savefig(buffer, format="png", dpi=DPI)
    write_bytes_atomic(png_path, buffer.getvalue())
    return {"csv": str(csv_path), "png": str(png_path)}
