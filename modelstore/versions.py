"""Version listings for the CLI and the backend: metrics, base checkpoint, training data size,
promotion state, correction rate, the head that serves prompts and whether the automatic head
was ever trained."""

from __future__ import annotations

import json
from typing import Any

from contracts.settings import Settings
from modelstore.registry import ModelRegistry
from modelstore.version_heads import heads_json


def correction_rates(settings: Settings) -> dict[str, Any]:
    path = settings.model_dir / "correction_rates.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def versions_json(registry: ModelRegistry, settings: Settings) -> list[dict[str, Any]]:
    current = registry.current()
    promoted = {e["version"] for e in registry.promotions()}
    superseded = registry.superseded()
    rates = correction_rates(settings)
    out = []
    for v in registry.versions():
        val = v.metrics.get("val", {}) if isinstance(v.metrics.get("val"), dict) else {}
        out.append(
            {
                "version": v.name,
                "current": v.name == current,
                "promoted": v.name in promoted,
                # would have been promoted, but the current version changed during its round
                "superseded": v.name in superseded and v.name not in promoted,
                "created_at": v.created_at,
                "parent": v.parent,
                "source": v.source,
                "base": (v.base or {}).get("name"),
                "labels": list(v.labels),
                "train_size": v.train_size,
                "val_size": v.metrics.get("val_size"),
                "metrics": val,
                "parent_metrics": v.metrics.get("parent_val", {}),
                "decision": v.metrics.get("decision"),
                "correction_rate": rates.get(v.name),
                "note": v.note,
                **heads_json(v, registry),
            }
        )
    return out


def per_label(metrics: dict[str, Any], key: str = "miou") -> dict[str, float]:
    """``{label: value}`` of a metric's per-label keys (``<key>/<label>``); empty for a
    single-label version, whose averaged value is its only label's."""
    prefix = f"{key}/"
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}


def interval_text(decision: dict[str, Any] | None) -> str:
    """``+0.041 [+0.012,+0.070]``: a round's paired difference and its bounds, or ``-``."""
    d = decision or {}
    if not all(isinstance(d.get(k), (int, float)) for k in ("mean", "low", "high")):
        return "-"
    return f"{d['mean']:+.3f} [{d['low']:+.3f},{d['high']:+.3f}]"


def version_table(rows: list[dict[str, Any]]) -> str:
    """A text table of :func:`versions_json` rows; versions with several labels also list
    each label's mIoU, in the version's label order."""
    head = (
        f"{'':2}{'version':<26}{'state':<10}{'train':>6}{'val':>5}{'mIoU':>8}{'S':>8}{'corr.':>8}"
        f"{'diff [interval]':>26}  {'prompts':<8}{'auto':<10}base"
    )
    lines = [head + "  (mIoU per label)"]
    for r in rows:
        state = "current" if r["current"] else ("promoted" if r["promoted"] else "candidate")
        if state == "candidate" and r.get("superseded"):
            state = "superseded"
        m = r["metrics"]
        corr = r["correction_rate"]
        values = per_label(m)
        order = [lab for lab in r.get("labels") or [] if lab in values]
        order += [lab for lab in values if lab not in order]
        labels = ", ".join(f"{lab} {values[lab]:.3f}" for lab in order)
        lines.append(
            f"{'*' if r['current'] else '':2}{r['version']:<26}{state:<10}{r['train_size']:>6}"
            f"{(r['val_size'] or 0):>5}{m.get('miou', float('nan')):>8.3f}"
            f"{m.get('sm', float('nan')):>8.3f}"
            f"{(corr['mean'] if corr else float('nan')):>8.3f}"
            f"{interval_text(r.get('decision')):>26}  {r.get('prompt_head', '-'):<8}"
            f"{'trained' if r.get('automatic_head_trained', True) else 'untrained':<10}"
            f"{r['base'] or '-'}" + (f"  ({labels})" if labels else "")
        )
    return "\n".join(lines)
