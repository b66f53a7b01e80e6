"""The write and read paths at project scale, against a real Label Studio 1.23.2 (SQLite).

``python -m bench.scale --tasks 1000 10000`` starts a Label Studio with the test harness
(tests/lstudio.py) and an embedded Redis, and per size: imports that many tasks, writes one
prediction per task in bulk (:class:`labelstudio.writeback.PredictionWriter`, calls of
``--batch``), writes ``--one-by-one`` more through ``POST /api/predictions`` (the old path)
for comparison in the same run, pages through the project with the predictions
(``fields=all``) and with only the fields a run needs, and measures the Redis bytes per task
of the run's bookkeeping with MEMORY USAGE. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import redis

from labelstudio.client import LabelStudioClient
from labelstudio.writeback import PredictionWriter

RESULT = [
    {
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "value": {"format": "rle", "rle": [7, 200, 3, 41] * 60, "brushlabels": ["Circle"]},
        "original_width": 256,
        "original_height": 256,
    }
]
BRUSH = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="Circle" background="#FF0000"/></BrushLabels></View>"""
RUN_FIELDS = ("id", "data", "is_labeled", "total_annotations", "cancelled_annotations")


def page_through(client: LabelStudioClient, project: int, size: int, **kw) -> tuple[int, float]:
    t0 = time.perf_counter()
    seen, page = 0, 1
    while True:
        tasks, total = client.task_page(project, page, size, **kw)
        seen += len(tasks)
        if not tasks or seen >= (total or 0):
            return seen, time.perf_counter() - t0
        page += 1


def measure(ls, conn: redis.Redis, n: int, batch: int, one_by_one: int) -> dict:
    client = LabelStudioClient(ls.url, ls.pat, timeout=600)
    project = ls.create_project(BRUSH, title=f"scale {n}")
    ids: list[int] = []
    t0 = time.perf_counter()
    for s in range(0, n, 5000):
        chunk = [{"data": {"image": f"/data/upload/x{i}.png"}} for i in range(s, min(n, s + 5000))]
        ids += ls.import_tasks(project, chunk)
    out: dict = {"tasks": n, "import_s": round(time.perf_counter() - t0, 1), "batch": batch}

    preds = [{"task": t, "result": RESULT, "score": 0.5, "model_version": "bulk"} for t in ids]
    writer = PredictionWriter(client, conn, batch)
    t0 = time.perf_counter()
    report = writer.write(project, "scale", preds)
    dt = time.perf_counter() - t0
    assert len(report.written) == n and not report.failed, report.failed
    out.update(bulk_write_s=round(dt, 2), bulk_per_s=round(n / dt, 1), bulk_calls=writer.calls)

    k = min(one_by_one, n)
    t0 = time.perf_counter()
    for t in ids[:k]:
        client.create_prediction(t, RESULT, 0.5, "one-by-one")
    dt = time.perf_counter() - t0
    out.update(one_by_one_tasks=k, one_by_one_per_s=round(k / dt, 1))
    out["bulk_vs_one_by_one"] = round(out["bulk_per_s"] / out["one_by_one_per_s"], 1)

    _, out["read_full_p100_s"] = page_through(client, project, 100, full=True)
    _, out["read_fields_p100_s"] = page_through(client, project, 100, include=RUN_FIELDS)
    _, out["read_fields_p1000_s"] = page_through(client, project, 1000, include=RUN_FIELDS)
    for key in [k for k in out if k.startswith("read_")]:
        out[key] = round(out[key], 2)

    written = conn.memory_usage("sam2unet:written:scale:bulk") or 0
    entry = zlib.compress(json.dumps(preds[0]).encode())
    conn.hset("bench:buffer", mapping={str(t): entry for t in ids[:batch]})
    buffer = conn.memory_usage("bench:buffer", samples=0) or 0
    conn.delete("bench:buffer")
    out.update(
        redis_written_bytes_per_task=round(written / n, 1),
        redis_buffer_bytes_per_task=round(buffer / batch, 1),
        buffer_entry_bytes=len(entry),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--batch", type=int, default=500, help="predictions per bulk call")
    ap.add_argument("--one-by-one", type=int, default=300, help="tasks on the old path")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from launcher.redis_server import EmbeddedRedis
    from tests.lstudio import running_label_studio

    with (
        EmbeddedRedis() as server,
        tempfile.TemporaryDirectory() as tmp,
        running_label_studio(Path(tmp) / "ls") as ls,
    ):
        conn = redis.Redis(port=server.port)
        for n in args.tasks:
            conn.flushdb()
            print(json.dumps(measure(ls, conn, n, args.batch, args.one_by_one)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
