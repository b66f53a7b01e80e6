"""Pre-annotation and the trainer's sync at project scale, against a real Label Studio 1.23.2
(SQLite, or PostgreSQL with ``--postgres``).

``python -m bench.scale --tasks 1000 10000`` starts a Label Studio with the test harness
(tests/lstudio.py) and an embedded Redis, and per size:

- **write**: one prediction per task in bulk (:class:`labelstudio.writeback.PredictionWriter`,
  calls of each ``--batch``), ``--one-by-one`` more through ``POST /api/predictions`` (the old
  path) for comparison in the same run;
- **read**: the project paged the old way (by offset, all fields, pages of 100), by offset with
  only the run's fields, and as runs now read it (by task id, the run's fields, pages of 100 and
  1000, with the range query for tasks already holding the version);
- **order** (sizes up to ``--order-max``): the ``diverse`` order of the whole run computed from
  stored features, then applied three ways: a ``PATCH`` per prediction (the old path), the
  predictions written once in bulk with their ranks' scores (what runs do), and written in bulk
  then replaced (Label Studio's bulk deletion, then a second bulk write);
- **sync**: the trainer's sync with ``--annotated`` of the tasks annotated, then 1% more
  annotated: an incremental sync against a full one (images from memory: what is timed is
  Label Studio's side);
- **e2e** (with ``--workers``): a real pre-annotation run (``contracts.preannotate.start_run``,
  pages of 1000) over that many distinct images served from loopback, by 1 and 2 real worker
  processes with the test-size model: tasks/s end to end, and the workers' own time per task
  (fetch, decode, forward, encode) from their logs;
- **Redis** bytes per task of a run's bookkeeping (MEMORY USAGE).

One JSON line per size (``--out`` appends them to a file); ``--plot PNG`` draws tasks/s and
time per task of each stage against project size (log scales) from that file.

100k: ``python -m bench.scale --tasks 100000 --workers 2 --order-max 0 --out scale.jsonl``
(hours on two shared cores: the bulk import's cost per call grows with the project).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
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


def _annotation() -> list[dict]:
    from labelstudio.codecs import brush_result
    from labelstudio.labelconfig import parse_label_config

    m = np.zeros((64, 64), bool)
    m[10:30, 20:40] = True
    item = brush_result(m, parse_label_config(BRUSH), "Circle", 1.0)
    item.pop("score", None)
    return [item]


ANNOTATION = _annotation()
FEATURE_DIM = 768  # the pooled trunk feature of SAM2's tiny/small Hiera


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, round(time.perf_counter() - t0, 3)


def page_by_offset(client: LabelStudioClient, project: int, size: int, **kw) -> int:
    seen, page = 0, 1
    while True:
        tasks, total = client.task_page(project, page, size, **kw)
        seen += len(tasks)
        if not tasks or seen >= (total or 0):
            return seen
        page += 1


def page_by_id(client: LabelStudioClient, project: int, size: int, version: str) -> int:
    """As a run reads: tasks after the last id, the run's fields, the range query."""
    from worker.run_pages import after_id_query

    seen, after = 0, 0
    while True:
        tasks, _ = client.task_page(
            project, 1, size, include=RUN_FIELDS, query=after_id_query(after)
        )
        ids = [t["id"] for t in tasks]
        if ids:
            client.tasks_with_prediction_between(project, version, ids[0], ids[-1])
        seen += len(tasks)
        if len(tasks) < size:
            return seen
        after = ids[-1]


def new_project(ls, n: int, title: str, data=None, annotated: float = 0.0) -> tuple[int, list]:
    project = ls.create_project(BRUSH, title=title)
    ids: list[int] = []
    every = round(1 / annotated) if annotated else 0
    for s in range(0, n, 5000):
        chunk = []
        for i in range(s, min(n, s + 5000)):
            task: dict = {"data": data(i) if data else {"image": f"/data/upload/x{i}.png"}}
            if every and i % every == 0:
                task["annotations"] = [{"result": ANNOTATION}]
            chunk.append(task)
        ids += ls.import_tasks(project, chunk)
    return project, ids


def measure_io(ls, conn: redis.Redis, n: int, batches: list[int], one_by_one: int,
               old_max: int) -> dict:  # fmt: skip
    client = LabelStudioClient(ls.url, ls.pat, timeout=600)
    out: dict = {"tasks": n}
    for batch in batches:
        (project, ids), out[f"import_s_{batch}"] = timed(new_project, ls, n, f"io {n}/{batch}")
        preds = [{"task": t, "result": RESULT, "score": 0.5, "model_version": "bulk"} for t in ids]
        writer = PredictionWriter(client, conn, batch)
        report, dt = timed(writer.write, project, f"scale-{batch}", preds)
        assert len(report.written) == n and not report.failed, report.failed
        out[f"bulk_{batch}_per_s"] = round(n / dt, 1)
        out[f"bulk_{batch}_s_per_call"] = round(dt / writer.calls, 2)
    k = min(one_by_one, n)
    t0 = time.perf_counter()
    for t in ids[:k]:
        client.create_prediction(t, RESULT, 0.5, "one-by-one")
    out["one_by_one_per_s"] = round(k / (time.perf_counter() - t0), 1)

    if n <= old_max:  # paging by offset and small pages: quadratic, hours at 100k
        _, out["read_offset_full_p100_s"] = timed(page_by_offset, client, project, 100, full=True)
        _, out["read_offset_fields_p100_s"] = timed(
            page_by_offset, client, project, 100, include=RUN_FIELDS
        )
    for size in (100, 1000) if n <= old_max else (1000,):
        seen, out[f"read_by_id_p{size}_s"] = timed(page_by_id, client, project, size, "sam2unet-x")
        assert seen == n, (seen, n)

    batch = batches[0]
    written = conn.memory_usage(f"sam2unet:written:scale-{batch}:bulk") or 0
    entry = zlib.compress(json.dumps(preds[0]).encode())
    conn.hset("bench:buffer", mapping={str(t): entry for t in ids[:batch]})
    buffer = conn.memory_usage("bench:buffer", samples=0) or 0
    conn.delete("bench:buffer")
    out.update(
        redis_written_bytes_per_task=round(written / n, 1),
        redis_buffer_bytes_per_task=round(buffer / batch, 1),
    )
    return out


def measure_order(ls, conn: redis.Redis, n: int, batch: int, old_max: int) -> dict:
    """The diverse order at ``n`` tasks, applied three ways (the two old ones up to
    ``old_max`` tasks)."""
    from worker.diverse_order import ordering, rank_scores, remember

    client = LabelStudioClient(ls.url, ls.pat, timeout=600)
    run = f"bench-order-{n}"
    rng = np.random.default_rng(0)
    remember(conn, run, ((i, float(rng.random()), rng.normal(size=FEATURE_DIM)) for i in range(n)))
    feats_bytes = (conn.memory_usage(f"sam2unet:preannotate:diverse:{run}:features", samples=0)
                   or 0)  # fmt: skip
    order, dt = timed(ordering, conn, run, 20, 2000)
    out = {"order_compute_s": dt, "redis_diverse_bytes_per_task": round(feats_bytes / n, 1)}
    ranked = rank_scores(order)
    score_at = [ranked[i] for i in range(n)]  # the i-th task of a project gets the i-th's rank

    # what runs do: each prediction written once, with its rank's score
    _, ids = project_ids = new_project(ls, n, f"order {n}")
    preds = [
        {"task": t, "result": RESULT, "score": score_at[i], "model_version": "o1"}
        for i, t in enumerate(ids)
    ]
    _, out["order_then_bulk_write_s"] = timed(
        PredictionWriter(client, None, batch).write, project_ids[0], "o1", preds
    )
    if n > old_max:
        return out
    # the old path: predictions written one by one for their ids, then a PATCH per score
    _, ids = new_project(ls, n, f"order patch {n}")
    t0 = time.perf_counter()
    pids = [client.create_prediction(t, RESULT, 0.5, "o2")["id"] for t in ids]
    out["old_write_one_by_one_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    for i, p in enumerate(pids):
        client.update_prediction_score(p, score_at[i])
    out["patch_per_task_s"] = round(time.perf_counter() - t0, 3)
    # written in bulk as the run goes, then replaced: Label Studio's bulk deletion (it removes
    # every model version's predictions of the tasks) and a second bulk write
    project, ids = new_project(ls, n, f"order replace {n}")
    preds = [{"task": t, "result": RESULT, "score": 0.5, "model_version": "o3"} for t in ids]
    t0 = time.perf_counter()
    PredictionWriter(client, None, batch).write(project, "o3", preds)
    r = ls.api(
        "POST",
        "/api/dm/actions",
        params={"id": "delete_tasks_predictions", "project": project},
        json={"selectedItems": {"all": True, "excluded": []}, "project": project},
    )
    assert r.ok, r.text
    for i, p in enumerate(preds):
        p["score"] = score_at[i]
    PredictionWriter(client, None, batch).write(project, "o3", preds)
    out["bulk_write_then_replace_s"] = round(time.perf_counter() - t0, 3)
    return out


def measure_sync(ls, n: int, annotated: float) -> dict:
    """The trainer's sync: full vs incremental after 1% more tasks are annotated."""
    from sam2unet.synthetic import make_domain_sample, sample_rng
    from tests.support.services import png_bytes
    from trainer.dataset import DatasetCache

    client = LabelStudioClient(ls.url, ls.pat, timeout=600)
    project, ids = new_project(ls, n, f"sync {n}", annotated=annotated)
    png = png_bytes(make_domain_sample(sample_rng(1, 0), 64, "easy")[0])

    def fetch(url, base, task):
        return png

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # no margin (the trainer's default re-reads the last 5 minutes, which here would be
        # every task, all imported just now): one second between the import and the first sync
        time.sleep(1.1)
        inc_cache = DatasetCache(Path(tmp) / "a", margin=0)
        full_cache = DatasetCache(Path(tmp) / "b", margin=0)
        _, out["sync_first_full_s"] = timed(inc_cache.sync, client, project, fetch)
        full_cache.sync(client, project, fetch)
        every = round(1 / annotated)
        fresh = [t for i, t in enumerate(ids) if i % every][: max(1, n // 100)]
        for t in fresh:  # 1% of the tasks annotated since
            ls.annotate(t, ANNOTATION)
        inc, out["sync_incremental_s"] = timed(inc_cache.sync, client, project, fetch)
        full, out["sync_full_s"] = timed(full_cache.sync, client, project, fetch, full=True)
        assert inc.mode == "incremental" and inc.added == len(fresh), inc
        assert full.samples == inc.samples and full.added == len(fresh), (full, inc)
    out.update(sync_samples=inc.samples, sync_incremental_read=inc.read, sync_changed=len(fresh))
    return out


def trained_model_dir(root: Path) -> Path:
    """A test-size model whose decoder is trained briefly on synthetic shapes (as the tests'
    fixture): pre-annotation runs refuse an untrained one."""
    from contracts.settings import Settings
    from modelstore.bootstrap import ensure_current_version
    from modelstore.registry import ModelRegistry
    from sam2unet.data import ArraySource, SegmentationDataset
    from sam2unet.synthetic import generate
    from sam2unet.train_config import TrainConfig
    from sam2unet.training import train

    registry = ModelRegistry(root, None)
    first = ensure_current_version(
        registry, Settings(model_size="test", image_size=64, model_dir=root)
    )
    loaded = registry.load(first.name)
    data = SegmentationDataset(ArraySource(generate(48, 64, seed=1)), 64, train=True)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=3e-3, device="cpu", progress_bar=False)
    result = train(loaded, data, None, cfg)
    info = registry.create_version(result.model, loaded.config, loaded.base, parent=first.name)
    registry.promote(info.name, reason="bench")
    return root


_STAGES = re.compile(
    r"(\d+) items \((\d+) cached, \d+ failed\) fetch ([\d.]+)s decode ([\d.]+)s forward "
    r"([\d.]+)s encode ([\d.]+)s"
)


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MiB)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):  # a child may have ended meanwhile
                total += p.memory_info().rss
        return total / 2**20
    return 0.0


def measure_e2e(ls, redis_url: str, n: int, workers: int, model_dir: Path, base: str,
                tmp: Path) -> dict:  # fmt: skip
    """A real pre-annotation run of ``n`` distinct images by ``workers`` worker processes,
    started and watched through a real backend (as the UI's status page would: every 0.5 s),
    whose memory is sampled meanwhile."""
    import requests

    from contracts import preannotate as runs
    from launcher.redis_server import free_port
    from tests.support.services import backend_process, label_studio_env
    from tests.support.services import workers as worker_processes

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()  # no result cached by an earlier run
    project, _ = new_project(
        ls, n, f"e2e {n}/{workers}", data=lambda i: {"image": f"{base}/{i}.png"}
    )
    auth = ("bench", "bench-secret")
    env = label_studio_env(redis_url, model_dir, ls, auth, SAM2UNET_JOB_LEASE="30")
    logs = tmp / f"logs-{n}-{workers}"
    logs.mkdir()
    port = free_port()
    backend = backend_process(env, port, logs)
    url = f"http://127.0.0.1:{port}"
    try:
        backend.wait_http(f"{url}/health")
        rss = [_tree_rss_mb(backend.proc.pid)]
        with worker_processes(env, conn, workers, logs) as procs:
            t0 = time.perf_counter()
            r = requests.post(f"{url}/preannotate", json={"project": project}, auth=auth,
                              timeout=60)  # fmt: skip
            r.raise_for_status()
            run_id = r.json()["id"]
            while True:
                st = requests.get(f"{url}/preannotate/{run_id}", auth=auth, timeout=60).json()
                rss.append(_tree_rss_mb(backend.proc.pid))
                if st["status"] != "running":
                    break
                time.sleep(0.5)
            wall = time.perf_counter() - t0
            text = "".join(p.log() for p in procs)
    finally:
        backend.stop()
    assert st["status"] == "completed" and st["done"] == n, st
    sums = np.zeros(4)
    items = cached = 0
    for m in _STAGES.finditer(text):
        items += int(m.group(1))
        cached += int(m.group(2))
        sums += [float(m.group(k)) for k in range(3, 7)]
    per = {f"worker_{k}_ms_per_task": round(1000 * v / max(1, items), 2)
           for k, v in zip(("fetch", "decode", "forward", "encode"), sums, strict=True)}  # fmt: skip
    version = st["model_version"]
    written = conn.memory_usage(f"sam2unet:written:{run_id}:{version}") or 0
    bookkeeping = sum(
        conn.memory_usage(k) or 0
        for k in (runs.RUN_PREFIX + run_id, f"sam2unet:preannotate:cursor:{run_id}")
    )
    return {
        f"e2e_w{workers}_s": round(wall, 1),
        f"e2e_w{workers}_tasks_per_s": round(n / wall, 1),
        f"e2e_w{workers}_cached": cached,
        **{f"e2e_w{workers}_{k}": v for k, v in per.items()},
        f"e2e_w{workers}_backend_rss_mb_start": round(rss[0], 1),
        f"e2e_w{workers}_backend_rss_mb_max": round(max(rss), 1),
        "redis_run_bytes_per_task": round((written + bookkeeping) / n, 1),
    }


def write_images(directory: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(7)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = directory / f"{i}.png"
        if not path.exists():
            img = rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            path.write_bytes(buf.getvalue())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["tasks"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.2))
    for key, label in (
        ("e2e_w1_tasks_per_s", "pre-annotation, 1 worker"),
        ("e2e_w2_tasks_per_s", "pre-annotation, 2 workers"),
        ("e2e_auto_w1_tasks_per_s", "pre-annotation, 1 worker, calls sized from the run"),
        ("bulk_500_per_s", "bulk writes (500 a call)"),
        ("bulk_2000_per_s", "bulk writes (2000 a call)"),
        ("one_by_one_per_s", "writes one by one (old)"),
    ):
        pts = [(r["tasks"], r[key]) for r in rows if key in r]
        if pts:
            a.plot(*zip(*pts, strict=True), marker="o", label=label)
    a.set(xscale="log", yscale="log", xlabel="tasks in the project", ylabel="tasks/s")
    a.set_title("throughput")
    a.legend(fontsize=8)
    stages = {
        "read (by id, pages of 1000)": lambda r: r["read_by_id_p1000_s"] / r["tasks"],
        "read (old: offset, all fields, 100)": lambda r: r["read_offset_full_p100_s"] / r["tasks"],
        "write (bulk, 500 a call)": lambda r: 1 / r["bulk_500_per_s"],
        "predict (worker: fetch+decode+forward+encode)": lambda r: (
            sum(
                r[f"e2e_w1_worker_{k}_ms_per_task"]
                for k in ("fetch", "decode", "forward", "encode")
            )
            / 1000
        ),
        "trainer sync, incremental (per task)": lambda r: r["sync_incremental_s"] / r["tasks"],
        "trainer sync, full (per task)": lambda r: r["sync_full_s"] / r["tasks"],
        "diverse order, computed": lambda r: r["order_compute_s"] / r["tasks"],
        "diverse order, then written": lambda r: r["order_then_bulk_write_s"] / r["tasks"],
        "end to end, 1 worker": lambda r: 1 / r["e2e_w1_tasks_per_s"],
        "end to end, 2 workers": lambda r: 1 / r["e2e_w2_tasks_per_s"],
    }
    for label, f in stages.items():
        pts = []
        for r in rows:
            with contextlib.suppress(KeyError, ZeroDivisionError):
                pts.append((r["tasks"], 1000 * f(r)))
        if pts:
            b.plot(*zip(*pts, strict=True), marker="o", label=label)
    b.set(xscale="log", yscale="log", xlabel="tasks in the project", ylabel="ms per task")
    b.set_title("time per task of each stage")
    b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--tasks", type=int, nargs="*", default=[1000, 10000], help="none: --plot only")
    ap.add_argument("--batch", type=int, nargs="+", default=[500, 2000], help="per bulk call")
    ap.add_argument("--one-by-one", type=int, default=300, help="tasks on the old write path")
    ap.add_argument("--order-max", type=int, default=1000, help="order only up to this size")
    ap.add_argument("--old-max", type=int, default=10000,
                    help="the old paths (offset paging, PATCH, one by one) up to this size")  # fmt: skip
    ap.add_argument("--annotated", type=float, default=0.1, help="share annotated (sync)")
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="e2e runs")
    ap.add_argument("--skip", nargs="*", default=[], choices=["io", "order", "sync", "e2e"])
    ap.add_argument("--ls-env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="environment for Label Studio, e.g. its feature flags")  # fmt: skip
    ap.add_argument("--postgres", action="store_true",
                    help="Label Studio on a fresh PostgreSQL (the distribution's) instead of SQLite")  # fmt: skip
    ap.add_argument("--out", type=Path, help="append the JSON lines to this file")
    ap.add_argument("--plot", type=Path, help="PNG of the --out file's rows")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.plot and not args.tasks:
        plot([json.loads(x) for x in args.out.read_text().splitlines() if x.strip()], args.plot)
        return 0
    ls_env = dict(x.split("=", 1) for x in args.ls_env)
    from launcher.redis_server import EmbeddedRedis
    from tests.support.lstudio import running_label_studio
    from tests.support.postgres import running_postgres
    from tests.support.services import file_server

    with (
        EmbeddedRedis() as server,
        tempfile.TemporaryDirectory() as tmp,
        running_postgres() if args.postgres else contextlib.nullcontext({}) as db_env,
        # a fresh PostgreSQL database is migrated by this start (the template is SQLite's)
        running_label_studio(
            Path(tmp) / "ls", extra_env=ls_env | db_env, template=not args.postgres
        ) as ls,
    ):
        redis_url = f"redis://127.0.0.1:{server.port}/0"
        conn = redis.Redis.from_url(redis_url)
        model_dir = None
        if args.workers and "e2e" not in args.skip:
            model_dir = trained_model_dir(Path(tmp) / "models")
            write_images(Path(tmp) / "images", max(args.tasks))
        with file_server(Path(tmp) / "images") as base:
            for n in args.tasks:
                conn.flushdb()
                row: dict = {"tasks": n, "database": "postgresql" if args.postgres else "sqlite"}
                row |= {"ls_env": ls_env} if ls_env else {}
                if "io" not in args.skip:
                    row |= measure_io(ls, conn, n, args.batch, args.one_by_one, args.old_max)
                if "order" not in args.skip and n <= args.order_max:
                    row |= measure_order(ls, conn, n, args.batch[0], args.old_max)
                if "sync" not in args.skip:
                    row |= measure_sync(ls, n, args.annotated)
                for w in args.workers if model_dir else []:
                    row |= measure_e2e(ls, redis_url, n, w, model_dir, base, Path(tmp))
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    if args.plot and args.out:
        plot([json.loads(x) for x in args.out.read_text().splitlines() if x.strip()], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
