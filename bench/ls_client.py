"""``python -m bench.ls_client``: our Label Studio client against label-studio-sdk's, on one local
server answering Label Studio 1.23's task-list format (500 tasks, pages of 100, legacy token):
the SDK client's import and memory cost in a process that already parses label configs with the
SDK, and the time to page through the tasks."""

import json
import resource
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

N = 500
TASKS = [
    {
        "id": i + 1,
        "data": {"image": f"/data/upload/1/img{i}.png"},
        "annotations": [],
        "predictions": [],
        "project": 1,
        "meta": {},
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "is_labeled": False,
        "overlap": 1,
        "inner_id": i + 1,
        "total_annotations": 0,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "file_upload": None,
        "updated_by": [],
        "comment_authors": [],
        "annotators": [],
        "drafts": [],
    }
    for i in range(N)
]


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        page = int(q.get("page", ["1"])[0])
        ps = int(q.get("page_size", ["100"])[0])
        chunk = TASKS[(page - 1) * ps : page * ps]
        if not chunk and page > 1:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps(
            {"tasks": chunk, "total": N, "total_annotations": 0, "total_predictions": 0}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{srv.server_port}"
import labelstudio.labelconfig  # noqa: E402,F401  (every service loads the SDK's label_interface)
from labelstudio.client import LabelStudioClient  # noqa: E402

rss0, mods0, t0 = (
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    len(sys.modules),
    time.perf_counter(),
)
from label_studio_sdk.client import LabelStudio  # noqa: E402

sdk = LabelStudio(base_url=url, api_key="x" * 40)
print(
    f"label-studio-sdk client import + construction: {(time.perf_counter() - t0) * 1000:.0f} ms, "
    f"+{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024:.0f} MB peak RSS, "
    f"+{len(sys.modules) - mods0} modules"
)
ours = LabelStudioClient(url, "x" * 40)


def run(f, n=7):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        k = f()
        ts.append(time.perf_counter() - t)
        assert k == N, k
    return statistics.median(ts) * 1000


a = run(lambda: sum(1 for _ in ours.iter_tasks(1, page_size=100)))
b = run(lambda: sum(1 for _ in sdk.tasks.list(project=1, page_size=100, fields="all")))
print(f"500 tasks in pages of 100: ours {a:.0f} ms, label-studio-sdk {b:.0f} ms (median of 7)")
