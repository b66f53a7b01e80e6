"""Version listings for the CLI and the backend: metrics, base checkpoint, training data size,
promotion state and correction rate."""

from __future__ import annotations

import json
from typing import Any

from common.registry import ModelRegistry
from common.settings import Settings


def correction_rates(settings: Settings) -> dict[str, Any]:
    path = settings.model_dir / "correction_rates.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def versions_json(registry: ModelRegistry, settings: Settings) -> list[dict[str, Any]]:
    current = registry.current()
    promoted = {e["version"] for e in registry.promotions()}
    rates = correction_rates(settings)
    out = []
    for v in registry.versions():
        val = v.metrics.get("val", {}) if isinstance(v.metrics.get("val"), dict) else {}
        out.append(
            {
                "version": v.name,
                "current": v.name == current,
                "promoted": v.name in promoted,
                "created_at": v.created_at,
                "parent": v.parent,
                "source": v.source,
                "base": (v.base or {}).get("name"),
                "labels": list(v.labels),
                "train_size": v.train_size,
                "val_size": v.metrics.get("val_size"),
                "metrics": val,
                "parent_metrics": v.metrics.get("parent_val", {}),
                "correction_rate": rates.get(v.name),
                "note": v.note,
            }
        )
    return out


def version_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'':2}{'version':<26}{'state':<10}{'train':>6}{'val':>5}{'mIoU':>8}{'S':>8}{'corr.':>8}  base"
    lines = [head]
    for r in rows:
        state = "current" if r["current"] else ("promoted" if r["promoted"] else "candidate")
        m = r["metrics"]
        corr = r["correction_rate"]
        lines.append(
            f"{'*' if r['current'] else '':2}{r['version']:<26}{state:<10}{r['train_size']:>6}"
            f"{(r['val_size'] or 0):>5}{m.get('miou', float('nan')):>8.3f}"
            f"{m.get('sm', float('nan')):>8.3f}"
            f"{(corr['mean'] if corr else float('nan')):>8.3f}  {r['base'] or '-'}"
        )
    return "\n".join(lines)
