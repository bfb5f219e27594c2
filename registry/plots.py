"""PNG plots of a federated run's per-round metrics, for the dossier and the MLflow UI.

Drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch);
the PNGs carry no software or date metadata, so the same history gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .run_history import History, Series, site_series

__all__ = ["DICE_PLOT", "UPDATE_NORM_PLOT", "EPSILON_PLOT", "available_plots", "render_plots"]

DICE_PLOT = "dice_per_round.png"
UPDATE_NORM_PLOT = "update_norms.png"
EPSILON_PLOT = "epsilon_per_round.png"

_POOLED = "eval/dice_pooled"
_WORST = "eval/dice_min"
_SIZE_IN = (6.4, 3.6)
_DPI = 80


def available_plots(history: History) -> list[str]:
    """Names of the plots :func:`render_plots` draws for ``history``, in dossier order."""
    names = []
    if site_series(history, "evaluate", "dice") or history.get(_POOLED):
        names.append(DICE_PLOT)
    if site_series(history, "train", "update-norm"):
        names.append(UPDATE_NORM_PLOT)
    if site_series(history, "train", "epsilon"):
        names.append(EPSILON_PLOT)
    return names


def render_plots(history: History) -> dict[str, bytes]:
    """PNG bytes by file name: Dice per round always (when evaluated), update norms and
    per-site epsilon only when the run logged them."""
    plots: dict[str, bytes] = {}
    for name in available_plots(history):
        if name == DICE_PLOT:
            lines = {s: (v, {}) for s, v in site_series(history, "evaluate", "dice").items()}
            if history.get(_POOLED):
                lines["pooled"] = (history[_POOLED], {"color": "black", "linewidth": 2.4})
            if history.get(_WORST):
                lines["worst site"] = (history[_WORST], {"color": "tab:red", "linestyle": "--"})
            plots[name] = _line_plot("Held-out Dice per round", "Dice", lines, ylim=(0.0, 1.0))
        elif name == UPDATE_NORM_PLOT:
            lines = {s: (v, {}) for s, v in site_series(history, "train", "update-norm").items()}
            plots[name] = _line_plot("Norm of each site's update per round", "L2 norm", lines)
        else:
            lines = {s: (v, {}) for s, v in site_series(history, "train", "epsilon").items()}
            plots[name] = _line_plot("Privacy spent per site (epsilon)", "epsilon", lines)
    return plots


def _line_plot(
    title: str,
    ylabel: str,
    lines: Mapping[str, tuple[Series, dict[str, object]]],
    ylim: tuple[float, float] | None = None,
) -> bytes:
    fig = Figure(figsize=_SIZE_IN, dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (series, style) in lines.items():
        rounds = [step for step, _ in series]
        values = [value for _, value in series]
        ax.plot(rounds, values, marker="o", markersize=3, label=label, **style)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(lines) > 6 else 1)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
