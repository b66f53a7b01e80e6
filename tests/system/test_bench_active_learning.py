"""The active-learning benchmark end to end at its smoke size (``--quick``): the simulated
annotator, real rounds of the trainer's own ``run_round``, the acquisition strategies the workers
run, and the three result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_a_table_per_strategy(tmp_path):
    out = tmp_path / "al"
    p = subprocess.run(
        [sys.executable, "-m", "bench.active_learning", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    data = json.loads((out / "active-learning.json").read_text())
    table, runs = data["table"], data["runs"]
    assert list(table) == ["random", "confidence"]
    assert [r["strategy"] for r in runs] == ["random", "confidence"]
    k, rounds = data["options"]["k"], data["options"]["rounds"]
    for row in table.values():
        # the first K random labels, then one point per acquisition round
        assert row["labels"] == [k * (i + 1) for i in range(rounds + 1)]
        assert all(0.0 <= v <= 1.0 for v in row["mean"])
        assert 0.0 <= row["auc"] <= 1.0
        assert sum(row["picked_domains"].values()) == row["labels"][-1]
    # both strategies start from the same first K random labels and the same first round
    assert runs[0]["miou"][0] == runs[1]["miou"][0]
    assert data["costs"] == {}  # --quick skips the cost measurement
    md = (out / "active-learning.md").read_text()
    assert "| random |" in md and "| confidence |" in md
    assert (out / "active-learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
