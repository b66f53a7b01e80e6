"""The markdown report of a bench run (``latest.md``)."""

from __future__ import annotations

import time
from typing import Any

E2E_TARGET = 0.9
QUEUE_TARGET_MS = 5.0
TRAIN_TARGET = 0.9
WORKER_RSS_MARGIN_MB = 512.0

STAGE_LABELS = {
    "fetch": "fetch (HTTP from loopback; a job's images in parallel)",
    "decode": "decode",
    "preprocess": "preprocess (resize + normalise)",
    "model": "forward (model)",
    "upsample": "postprocess: upsample to image size",
    "threshold_score": "postprocess: threshold + score",
    "rle": "encode (RLE)",
    "job_other": "rest of the job function",
    "queue_between_jobs": "queue between jobs (reply, rq, next dequeue)",
    "request_lead_tail": "request: before first job + after last",
    "backend_in": "queue: request -> enqueued (Flask, parsing)",
    "queue_in": "queue: enqueued -> job starts",
    "queue_out": "queue: work done -> reply received",
    "backend_out": "queue: reply -> response",
}


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if x != x:  # NaN
            return "n/a"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return [*out, ""]


def _machine(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    ls, le = r["load_start"], r["load_end"]
    lines = [
        f"- Command: `{r['command']}`",
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(r['started']))}, "
        f"{_f(r['finished'] - r['started'], 0)} s",
        f"- CPU: {m['cpu']}, {m['cores_usable']} usable cores ({m['cores_logical']} logical), "
        f"{_f(m['memory_gb'], 1)} GB RAM",
        f"- torch {m['torch']}, Python {m['python']}, torch threads {m['torch_threads']}, "
        f"device {m['device']}" + (f" ({m['gpu']}, CUDA {m['cuda']})" if "gpu" in m else ""),
        f"- Load average (1/5/15 min) at start {_f(ls['1m'])} / {_f(ls['5m'])} / {_f(ls['15m'])}, "
        f"at end {_f(le['1m'])} / {_f(le['5m'])} / {_f(le['15m'])}",
        "",
    ]
    return lines


def _forward(s: dict[str, Any]) -> list[str]:
    peaks = ", ".join(
        f"{d} {p['n']}x{p['n']} matmul {_f(p['flops_per_s'] / 1e9, 1)} GFLOP/s"
        for d, p in s["peaks"].items()
    )
    lines = ["## 1. Raw model forward", "", f"Peak: {peaks}. bf16 autocast: {s['bf16']}.", ""]
    rows = [
        [
            r["size"],
            r["image_size"],
            r["batch"],
            r["dtype"],
            r["images_per_s"],
            r["median_s"] * 1000,
            r["flops_per_image"] / 1e9,
            r["achieved_flops_per_s"] / 1e9,
            f"{100 * r['efficiency']:.1f}%",
        ]
        for r in s["rows"]
    ]
    header = ["size", "input", "batch", "dtype", "images/s", "ms/batch", "GFLOP/image"]
    return lines + _table([*header, "GFLOP/s", "of peak"], rows)


def _e2e(s: dict[str, Any]) -> list[str]:
    t = s["throughput"]
    lines = [
        "## 2. End-to-end pre-annotation (backend + Redis + worker)",
        "",
        f"{t['tasks']} tasks of {s['image_hw'][1]}x{s['image_hw'][0]} JPEG in one /predict "
        f"request, split into {t['jobs']} jobs of {s['batch']}, "
        f"{s.get('per_pass', s['batch'])} image(s) per forward pass; {s['workers']} worker(s), "
        f"{s['dtype']}; failed tasks: {t['failed']}.",
        "",
    ]
    row = [
        s["size"],
        s["batch"],
        s["workers"],
        t["images_per_s"],
        s["raw_images_per_s"],
        s["ratio"],
        _ok(s["ratio"] >= E2E_TARGET),
        s.get("ratio_to_worker_forward"),
        s.get("raw_images_per_s_bench_process"),
        s.get("raw_images_per_s_section1"),
    ]
    header = ["model", "batch", "workers", "e2e images/s", "raw forward images/s", "ratio"]
    header += [f"ratio >= {E2E_TARGET}", "forward share", "raw, bench process", "raw, section 1"]
    lines += _table(header, [row])
    lines += [
        "Raw forward: the worker's own model on random input, as many images per pass as the "
        "worker runs, timed by the worker process just "
        "before and just after the run, over as many images each time (the ratio's reference; "
        "median per call). Forward share: the time the "
        "worker spent in forward passes during the run over the run's wall time. The same raw "
        "forward measured in the bench process and in section 1 shows how much a shared "
        "machine's load moves between measurements.",
        "",
    ]
    per = t["per_task_ms"]
    total = 1000.0 / t["images_per_s"]
    lines += ["Where the time of one task goes in this run (ms per task, stages summed over the "
              "run and divided by the tasks):", ""]  # fmt: skip
    rows = [[STAGE_LABELS[k], v, f"{100 * v / total:.1f}%"] for k, v in per.items()]
    rows.append(["**wall time per task**", total, "100%"])
    lines += _table(["stage", "ms/task", "share"], rows)
    return lines


def _breakdown(s: dict[str, Any]) -> list[str]:
    st = s["single_task_ms"]
    if not st:
        return []
    total = st["total"]["mean"]
    lines = [
        "## 4. Stage breakdown of one task (1-task /predict requests, "
        f"{s['size']} model, n={st['total']['n']})",
        "",
    ]
    keys = [
        "backend_in", "queue_in", "fetch", "decode", "preprocess", "model", "upsample",
        "threshold_score", "rle", "job_other", "queue_out", "backend_out",
    ]  # fmt: skip
    rows = [
        [STAGE_LABELS[k], st[k]["mean"], st[k]["p50"], f"{100 * st[k]['mean'] / total:.1f}%"]
        for k in keys
    ]
    rows.append(["**total request**", total, st["total"]["p50"], "100%"])
    return lines + _table(["stage", "mean ms", "p50 ms", "share"], rows)


def _queue(s: dict[str, Any]) -> list[str]:
    n = s["noop_ms"]
    lines = [
        "## 3. Queue overhead per task (no-op model)",
        "",
        f"{s['noop_requests']} sequential 1-task /predict requests (64x64 PNG) to a worker "
        "whose model answers zeros at once. Overhead = request time minus the job's stages "
        "(fetch, decode, preprocess, model, postprocess, encode).",
        "",
    ]
    rows = [
        ["/predict, whole request", n["total"]["n"], n["total"]["p50"], n["total"]["p99"], ""],
        [
            "**queue overhead**",
            n["overhead"]["n"],
            n["overhead"]["p50"],
            n["overhead"]["p99"],
            _ok(n["overhead"]["p50"] <= QUEUE_TARGET_MS),
        ],
    ]
    for k in ("backend_in", "queue_in", "job_other", "queue_out", "backend_out"):
        rows.append(["- " + STAGE_LABELS[k], n[k]["n"], n[k]["p50"], n[k]["p99"], ""])
    rows.append(["- fetch + decode (not overhead)", "", _sum_p50(n, ("fetch", "decode")), "", ""])
    e = s["rq_echo_ms"]
    rows.append(["bare rq SimpleWorker round trip", e["n"], e["p50"], e["p99"], ""])
    c = s.get("cold_start_ms")
    if c:
        rows.append(["first /predict to a just-started worker", 1, c["first"], "", ""])
        rows.append(["- the next ones", c["next"]["n"], c["next"]["p50"], c["next"]["p99"], ""])
    out = lines + _table(
        ["measurement", "n", "p50 ms", "p99 ms", f"p50 <= {QUEUE_TARGET_MS}"], rows
    )
    commands = s.get("redis_commands_per_request")
    if commands:
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(commands.items())[:8])
        out += [
            f"Redis commands per request (whole server, pipelined ones included): "
            f"{sum(commands.values()):.0f}; most: {top}.",
            "",
        ]
    return out


def _sum_p50(n: dict[str, Any], keys: tuple[str, ...]) -> float:
    return sum(n[k]["p50"] for k in keys)


def _train(s: dict[str, Any], e2e: dict[str, Any] | None) -> list[str]:
    lines = ["## 5. Training and memory", ""]
    row = [
        s["size"],
        s["image_size"],
        s["batch"],
        f"{s['samples']} x {s['epochs']}",
        s["dtype"],
        s["bare_images_per_s"],
        s["round_images_per_s"],
        s["ratio"],
        _ok(s["ratio"] >= TRAIN_TARGET),
        s["peak_rss_mb"],
    ]
    header = ["model", "input", "batch", "samples x epochs", "dtype", "bare step images/s"]
    header += ["round images/s", "ratio", f">= {TRAIN_TARGET}", "training peak RSS MB"]
    lines += _table(header, [row])
    if e2e:
        lines += _worker_memory(e2e)
    return lines


def _worker_memory(e2e: dict[str, Any]) -> list[str]:
    mem = e2e["worker_memory_mb"]
    ready = max(m.get("rss", 0.0) for m in e2e.get("worker_ready_memory_mb", [{}]))
    hwm = max(m.get("hwm", 0.0) for m in mem)
    over = e2e["worker_rss_over_model_mb"]
    header = ["worker", "model MB", "RSS when ready MB", "peak RSS MB", "peak - model MB"]
    header.append(f"<= model + {WORKER_RSS_MARGIN_MB:.0f} MB")
    row = [f"{e2e['size']}, batch {e2e['batch']}", e2e["model_mb"], ready, hwm, over]
    return _table(header, [[*row, _ok(over <= WORKER_RSS_MARGIN_MB)]])


def _baseline(s: dict[str, Any]) -> list[str]:
    ref = s["released_images_per_s"]
    rows = [
        ["released test loop (batch 1, re-created)", s["released_images_per_s"], 1.0],
        [f"Predictor (batch {s['batch']})", s["predictor_images_per_s"], None],
        ["worker path (section 2)", s["worker_images_per_s"], None],
    ]
    for r in rows[1:]:
        r[2] = r[1] / ref if r[1] else None
    lines = [
        "## 6. Baseline: the released test script's loop",
        "",
        f"{s['images']} images, {s['size']} model at {s['image_size']}; every path writes an "
        "8-bit PNG per image (the worker path: Label Studio RLE).",
        "",
    ]
    return lines + _table(["path", "images/s", "vs released"], rows)


def to_markdown(r: dict[str, Any]) -> str:
    lines = ["# sam2unet-assist benchmark: latest run", "", *_machine(r)]
    if "forward" in r:
        lines += _forward(r["forward"])
    if "e2e" in r:
        lines += _e2e(r["e2e"])
    if "queue" in r:
        lines += _queue(r["queue"])
    if "e2e" in r:
        lines += _breakdown(r["e2e"])
    if "train" in r:
        lines += _train(r["train"], r.get("e2e"))
    elif "e2e" in r:
        lines += _train_memory_only(r["e2e"])
    if "baseline" in r:
        lines += _baseline(r["baseline"])
    if "prompts" in r:
        lines += _prompts(r["prompts"])
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in r["section_seconds"].items())
    lines += [f"Section wall times: {secs}.", ""]
    return "\n".join(lines)


def _train_memory_only(e2e: dict[str, Any]) -> list[str]:
    return ["## 5. Worker memory", "", *_worker_memory(e2e)]


def _prompts(p: dict[str, Any]) -> list[str]:
    first, second = p["first_ms"], p["second_ms"]
    ok = "yes" if p["speedup_p50"] >= p["target"] else "**no**"
    h, w = p["image_hw"]
    return [
        "## 7. Interactive prompts: SAM2's head, first vs second prompt on an image",
        "",
        f"{p['size']} base, {p['images']} images of {h}x{w} (head input {p['head_input']}), "
        "each prompted twice through the worker's whole path (a click, then a box with a "
        "click); the second prompt finds the image's features in the embedding cache.",
        "",
        "| prompt | n | p50 ms | p99 ms | mean ms |",
        "| --- | --- | --- | --- | --- |",
        f"| first (trunk + neck + decoder) | {first['n']} | {first['p50']:.1f} | "
        f"{first['p99']:.1f} | {first['mean']:.1f} |",
        f"| second (cache hit: decoder only) | {second['n']} | {second['p50']:.1f} | "
        f"{second['p99']:.1f} | {second['mean']:.1f} |",
        "",
        f"Speed-up p50 {p['speedup_p50']:.1f}x, p99 {p['speedup_p99']:.1f}x "
        f"(target >= {p['target']:.0f}x at p50: {ok}); trunk runs during second prompts: "
        f"{p['trunk_runs_during_seconds']}.",
        "",
        f"Worker memory (RSS, MiB): {p['rss_mb_start']:.0f} at start, {p['rss_mb_loaded']:.0f} "
        f"with the model and head loaded, {p['rss_mb_cache_full']:.0f} with the cache full "
        f"({p['cache_entries']} images, {p['cache_bytes'] / 2**20:.1f} MiB of "
        f"{p['cache_mb']} MiB; {p['embedding_bytes_per_image'] / 2**20:.1f} MiB per image); "
        f"peak {p['hwm_mb']:.0f}.",
        "",
    ]
