"""The backend's gunicorn master: it only supervises its workers, so it loads none of the app's
modules (the workers import them after the fork): about 50 MB less resident memory per
backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_master_process_loads_none_of_the_apps_modules():
    probe = (
        "import json, sys; import backend.server; "
        "print(json.dumps(sorted(m for m in ('numpy', 'label_studio_sdk', 'backend.app', "
        "'backend.protocol', 'torch') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
