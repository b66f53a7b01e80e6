"""Training plots (matplotlib, Agg canvas; no display, no pyplot state).

- :func:`training_png`: one round, written as ``training.png`` inside the candidate's version
  directory (passed to :meth:`ModelRegistry.create_version` as an extra file, since a version is
  immutable once in place): training loss and learning rate per epoch, and the held-out metrics of
  the candidate next to those of the current version on the same tasks.
- :func:`versions_png`: every version, written as ``MODEL_DIR/versions.png`` after each round:
  held-out mIoU and S-measure and the annotators' correction rate per version, promoted versions
  filled, rejected candidates hollow.

Plots are a side product: :func:`safe_training_png` and :func:`write_versions_png` log a failure
and return None instead of failing a training round.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modelstore.versions import versions_json
from sam2unet.metrics import LOWER_IS_BETTER, METRIC_NAMES

log = logging.getLogger(__name__)

VERSIONS_PNG = "versions.png"
TRAINING_PNG = "training.png"
#: Metrics shown for a round, in this order, when present.
ROUND_METRICS = ("miou", "mdice", "sm", "wfm", "mean_em", "max_fm", "mae")
GREEN, RED, GREY, BLUE, ORANGE = "#2e7d32", "#c62828", "#9e9e9e", "#1565c0", "#ef6c00"
DPI = 110
BAR = 0.38  # width of a bar of the held-out plot


def _figure(width: float, height: float) -> Any:
    # matplotlib takes a third of a second to import: only when a plot is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _metric_name(key: str) -> str:
    name = METRIC_NAMES.get(key, key).replace(" (", "\n(").replace("weighted F", "weighted\nF")
    return f"{name}\n(lower is\nbetter)" if key in LOWER_IS_BETTER else name


def training_png(
    history: Sequence[Mapping[str, Any]],
    current: Mapping[str, float],
    candidate: Mapping[str, float],
    *,
    metric: str,
    promoted: bool,
    parent: str | None,
    project: int | None = None,
    train_size: int = 0,
    val_size: int = 0,
    decision: Mapping[str, Any] | None = None,
) -> bytes:
    """One round as a PNG: loss and learning rate per epoch (``history``: the
    :class:`sam2unet.train_config.EpochRecord` dicts) and candidate vs current held-out metrics;
    ``decision`` (:class:`trainer.promotion.PairedDecision` as JSON) adds the paired
    interval of the difference, drawn on the candidate's bar of the deciding metric."""
    fig = _figure(11.5, 4.6)
    ax_loss, ax_val = fig.subplots(1, 2, width_ratios=(1, 1.25))
    _draw_loss(ax_loss, history, train_size)
    _draw_held_out(ax_val, current, candidate, metric, promoted, parent, val_size, decision or {})
    where = f"project {project}" if project is not None else "training round"
    fig.suptitle(f"sam2unet-assist: {where}, fine-tuned from {parent or 'none'}", fontsize=12)
    return _png(fig)


def _draw_loss(ax_loss: Any, history: Sequence[Mapping[str, Any]], train_size: int) -> None:
    """Training loss per epoch, with the learning rate on a second axis."""
    epochs = [int(h["epoch"]) for h in history]
    losses = [float(h["loss"]) for h in history]
    ax_loss.plot(epochs, losses, marker="o", color=BLUE, label="training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (weighted BCE + IoU)", color=BLUE)
    ax_loss.set_title(f"Fine-tuning: {train_size} task(s), {len(epochs)} epoch(s)")
    ax_loss.grid(alpha=0.3)
    if not epochs:
        ax_loss.text(0.5, 0.5, "no epoch recorded", ha="center", transform=ax_loss.transAxes)
        return
    ax_loss.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    lrs = [float(h.get("lr", float("nan"))) for h in history]
    if any(_finite(v) for v in lrs):
        ax_lr = ax_loss.twinx()
        ax_lr.plot(epochs, lrs, linestyle="--", color=GREY, label="learning rate")
        ax_lr.set_ylabel("learning rate", color=GREY)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lines = ax_loss.get_lines() + ax_lr.get_lines()
        ax_loss.legend(lines, [ln.get_label() for ln in lines], loc="upper right")


def _draw_held_out(
    ax_val: Any,
    current: Mapping[str, float],
    candidate: Mapping[str, float],
    metric: str,
    promoted: bool,
    parent: str | None,
    val_size: int,
    decision: Mapping[str, Any],
) -> None:
    """Current and candidate side by side on each held-out metric, the deciding one in bold,
    with the paired interval when ``decision`` has one."""
    keys = [k for k in ROUND_METRICS if _finite(current.get(k)) or _finite(candidate.get(k))]
    if metric not in keys and (_finite(current.get(metric)) or _finite(candidate.get(metric))):
        keys.insert(0, metric)
    xs = list(range(len(keys)))
    cur = [float(current.get(k, float("nan"))) for k in keys]
    cand = [float(candidate.get(k, float("nan"))) for k in keys]
    colour = GREEN if promoted else RED
    bars_cur = ax_val.bar(
        [x - BAR / 2 for x in xs], cur, BAR, color=GREY, label=f"current ({parent or 'none'})"
    )
    bars_cand = ax_val.bar([x + BAR / 2 for x in xs], cand, BAR, color=colour, label="candidate")
    for bars in (bars_cur, bars_cand):
        ax_val.bar_label(bars, fmt="%.2f", fontsize=7.5, padding=2)
    interval = ""
    if metric in keys and all(_finite(decision.get(k)) for k in ("mean", "low", "high")):
        interval = _draw_interval(
            ax_val, keys.index(metric), cur[keys.index(metric)], metric, decision
        )
    ax_val.set_xticks(xs, [_metric_name(k) for k in keys], fontsize=9)
    if metric in keys:
        tick = ax_val.get_xticklabels()[keys.index(metric)]
        tick.set_fontweight("bold")
    top = max([v for v in cur + cand if _finite(v)], default=1.0)
    ax_val.set_ylim(0, max(1.0, top) * 1.12)
    ax_val.set_ylabel(f"held-out score ({val_size} task(s))")
    verdict = "PROMOTED" if promoted else "REJECTED"
    ax_val.set_title(
        f"Same held-out tasks: candidate {verdict} ({METRIC_NAMES.get(metric, metric)})" + interval,
        color=colour,
        fontsize=10,
    )
    if keys:
        ax_val.legend(loc="upper right", fontsize=9)
    else:
        ax_val.text(0.5, 0.5, "no held-out metrics", ha="center", transform=ax_val.transAxes)
    ax_val.grid(axis="y", alpha=0.3)


def _draw_interval(ax_val: Any, x: int, base: float, metric: str, d: Mapping[str, Any]) -> str:
    """The paired interval of the difference on the candidate's bar at ``x`` (from the
    current version's score ``base``); returns the line it adds to the title."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # the difference is "positive: better"
    lo, hi = sorted((base + sign * d["low"], base + sign * d["high"]))
    ax_val.errorbar(
        [x + BAR / 2],
        [(lo + hi) / 2],
        yerr=[[(hi - lo) / 2], [(hi - lo) / 2]],
        fmt="none",
        ecolor="black",
        capsize=5,
        lw=1.5,
    )
    return (
        f"\ndifference {d['mean']:+.3f}, {d.get('confidence', 0):.0%} bounds "
        f"[{d['low']:+.3f}, {d['high']:+.3f}], promote if lower >= {-(d.get('tolerance') or 0) + 0.0:+.3f}"
    )


def safe_training_png(report: Any, promoted: bool) -> bytes | None:
    """:func:`training_png` of a :class:`trainer.round.RoundReport` (before its status is set),
    or None (logged) when the plot cannot be made."""
    try:
        return training_png(
            report.history,
            report.current_metrics,
            report.candidate_metrics,
            metric=report.metric,
            promoted=promoted,
            parent=report.parent,
            project=report.project,
            train_size=report.train_size,
            val_size=report.val_size,
            decision=getattr(report, "decision", None),
        )
    except Exception:  # a plot is a side product: it never fails a round
        log.exception("could not draw the round's training plot")
        return None


def versions_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Every version as a PNG. ``rows``: :func:`modelstore.versions.versions_json` (oldest first)."""
    fig = _figure(min(18.0, max(7.5, 1.0 + 0.75 * len(rows))), 4.8)
    ax = fig.subplots()
    _draw_version_metrics(ax, rows)
    _draw_correction_rates(ax, rows)
    _draw_version_axes(ax, rows)
    return _png(fig)


def _draw_version_metrics(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Held-out mIoU and S-measure per version: promoted ones filled and joined by a line,
    others hollow."""
    xs = list(range(len(rows)))
    series = (
        ("miou", "held-out mIoU", BLUE, "o"),
        ("sm", "held-out S-measure", GREEN, "s"),
    )
    for key, label, colour, marker in series:
        pts = [(x, (r.get("metrics") or {}).get(key)) for x, r in zip(xs, rows, strict=True)]
        pts = [(x, float(v)) for x, v in pts if _finite(v)]
        if not pts:
            continue
        kept = [(x, v) for x, v in pts if rows[x].get("promoted")]  # the line of promoted ones
        ax.plot([p[0] for p in kept], [p[1] for p in kept], color=colour, alpha=0.5, lw=1)
        for x, v in pts:
            promoted = rows[x].get("promoted")
            ax.scatter(
                [x],
                [v],
                s=60,
                marker=marker,
                edgecolors=colour,
                linewidths=1.8,
                facecolors=colour if promoted else "white",
                zorder=3,
            )
            if key == "miou" and len(rows) <= 20:
                ax.annotate(
                    f"{v:.2f}",
                    (x, v),
                    textcoords="offset points",
                    xytext=(0, -14),
                    ha="center",
                    fontsize=7.5,
                    color=colour,
                )
        ax.plot([], [], color=colour, marker=marker, label=label)


def _draw_correction_rates(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """The annotators' mean correction rate per version, as bars."""
    corr = [(x, (r.get("correction_rate") or {}).get("mean")) for x, r in enumerate(rows)]
    corr = [(x, float(v)) for x, v in corr if _finite(v)]
    if corr:
        ax.bar(
            [p[0] for p in corr],
            [p[1] for p in corr],
            width=0.5,
            color=ORANGE,
            alpha=0.35,
            label="correction rate: 1 − Dice(pre-annotation, final annotation); lower is better",
        )


def _draw_version_axes(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """The current version shaded, the version names, the legend and the title."""
    xs = list(range(len(rows)))
    names = [r["version"] for r in rows]
    for x, r in enumerate(rows):
        if r.get("current"):
            ax.axvspan(x - 0.45, x + 0.45, color=GREEN, alpha=0.08, lw=0)
    ax.scatter([], [], s=60, marker="o", edgecolors="black", facecolors="black", label="promoted")
    ax.scatter(
        [],
        [],
        s=60,
        marker="o",
        edgecolors="black",
        facecolors="white",
        label="not promoted (rejected or never evaluated)",
    )
    labels = [
        n.rsplit("-", 1)[-1] + (" *" if r.get("current") else "")
        for n, r in zip(names, rows, strict=True)
    ]
    step = max(1, math.ceil(len(rows) / 30))
    ax.set_xticks(xs[::step], labels[::step])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("version (* current; each evaluated on the held-out tasks of its own round)")
    ax.set_ylabel("score")
    prefix = names[0].rsplit("-", 1)[0] if names else "sam2unet"
    ax.set_title(f"{prefix}: model versions")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    if not rows:
        ax.text(0.5, 0.5, "no versions yet", ha="center", va="center", transform=ax.transAxes)


def write_versions_png(registry: Any, settings: Any) -> Path | None:
    """Redraw ``MODEL_DIR/versions.png`` (atomically); None (logged) when it cannot be drawn."""
    path = Path(settings.model_dir) / VERSIONS_PNG
    try:
        data = versions_png(versions_json(registry, settings))
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except Exception:  # a plot is a side product: it never fails a round
        log.exception("could not draw %s", path)
        return None
    return path
