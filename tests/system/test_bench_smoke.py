"""The bench command end to end at minimal sizes: every section runs against the real stack
(embedded Redis, worker subprocesses, loopback images, training in its own process) and the
results files are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((out / "latest.json").read_text()), (out / "latest.md").read_text()


def test_every_section_is_measured(results):
    r, _ = results
    for section in ("forward", "e2e", "queue", "train", "baseline", "prompts"):
        assert section in r, section
    assert r["machine"]["torch_threads"] == 1
    assert r["machine"]["cpu"]
    for key in ("1m", "5m", "15m"):
        assert r["load_start"][key] >= 0 and r["load_end"][key] >= 0


def test_forward_numbers_are_consistent(results):
    f = results[0]["forward"]
    assert f["peaks"]["fp32"]["flops_per_s"] > 0
    assert {(row["size"], row["batch"]) for row in f["rows"]} == {("test", 1), ("test", 2)}
    for row in f["rows"]:
        assert row["images_per_s"] > 0 and row["flops_per_image"] > 0
        assert row["efficiency"] == pytest.approx(
            row["flops_per_image"] * row["images_per_s"] / row["peak_flops_per_s"]
        )


def test_serving_sections_account_for_the_time(results):
    r = results[0]
    e2e = r["e2e"]
    t = e2e["throughput"]
    assert t["failed"] == 0 and t["tasks"] == 4 and t["jobs"] == 2
    assert e2e["ratio"] == pytest.approx(t["images_per_s"] / e2e["raw_images_per_s"])
    assert e2e["ratio_to_worker_forward"] == pytest.approx(t["model_seconds"] / t["seconds"])
    assert t["model_seconds"] > 0
    # the reference forward was timed by the worker process itself, over as many images
    raw = e2e["raw_seconds_in_worker"]
    assert len(raw["before"]) >= 2 and len(raw["after"]) >= 2
    assert e2e["raw_images_per_s_bench_process"] > 0
    # the per-task stages add up to the measured wall time per task (up to the rounding of
    # epoch timestamps: a double holds time.time() to about 0.2 microseconds)
    assert sum(t["per_task_ms"].values()) == pytest.approx(1000.0 / t["images_per_s"], abs=0.01)
    assert t["per_task_ms"]["model"] > 0 and t["per_task_ms"]["rle"] > 0
    single = e2e["single_task_ms"]
    assert single["total"]["n"] == 2 and single["model"]["mean"] > 0
    assert e2e["worker_memory_mb"][0]["hwm"] > e2e["model_mb"] > 0
    q = r["queue"]
    assert q["noop_ms"]["total"]["n"] == 20 and q["rq_echo_ms"]["n"] == 20
    assert 0 < q["noop_ms"]["overhead"]["p50"] <= q["noop_ms"]["total"]["p50"]
    assert 0 <= q["noop_ms"]["model"]["p50"] <= q["noop_ms"]["total"]["p50"]  # the no-op model
    assert q["rq_echo_ms"]["p50"] > 0


def test_training_and_baseline(results):
    r = results[0]
    t = r["train"]
    assert t["bare_images_per_s"] > 0 and t["round_images_per_s"] > 0
    assert t["ratio"] == pytest.approx(t["round_images_per_s"] / t["bare_images_per_s"])
    assert t["peak_rss_mb"] > 0
    b = r["baseline"]
    assert b["images"] == 2
    assert b["released_images_per_s"] > 0 and b["predictor_images_per_s"] > 0
    assert b["worker_images_per_s"] == pytest.approx(r["e2e"]["throughput"]["images_per_s"])


def test_markdown_report(results):
    _, md = results
    for heading in (
        "## 1. Raw model forward",
        "## 2. End-to-end pre-annotation",
        "## 3. Queue overhead per task",
        "## 4. Stage breakdown of one task",
        "## 5. Training and memory",
        "## 6. Baseline",
        "## 7. Interactive prompts",
    ):
        assert heading in md
    assert "python -m bench --quick --threads 1" in md


def test_prompts_section_second_prompt_skips_the_trunk(results):
    p = results[0]["prompts"]
    assert p["first_ms"]["n"] == p["second_ms"]["n"] == 2
    assert p["trunk_runs_during_seconds"] == 0
    assert p["cache_bytes"] <= p["cache_mb"] * 2**20 and p["cache_entries"] >= 1
    assert p["rss_mb_cache_full"] >= p["rss_mb_loaded"] > 0
