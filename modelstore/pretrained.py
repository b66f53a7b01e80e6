"""The SAM2-UNet authors' released task models: fetching one, verifying it, recording it.

The authors publish their trained models (all on the large Hiera trunk) in one Google Drive
folder linked from their README (github.com/WZH0120/SAM2-UNet, "Testing"), as
``SAM2UNet-<DATASET>.pth`` state dicts. ``sam2unet-assist download --pretrained NAME`` lists that
folder with gdown, downloads the file of ``NAME`` into ``MODEL_DIR/base``, loads it strictly
(:func:`sam2unet.build.load_released`), and records its name, file and sha256 in
``MODEL_DIR/base/pretrained.json``. The first version of an empty registry then starts from it
(:mod:`modelstore.bootstrap`): a trained model, so automatic masks from the start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contracts.errors import AssistError
from sam2unet.exceptions import CheckpointError

log = logging.getLogger(__name__)

#: The authors' Google Drive folder of trained models and prediction maps.
RELEASED_FOLDER_ID = "1w2fK8kLhtEmMWZ6G6w9_J17xwgfm3lev"
RELEASED_FOLDER_URL = f"https://drive.google.com/drive/folders/{RELEASED_FOLDER_ID}"

#: NAME -> (task, file name tokens: the folder's ``.pth`` whose name holds one of them).
RELEASED_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "camouflaged": ("camouflaged object detection", ("COD",)),
    "salient": ("salient object detection (DUTS)", ("SOD", "DUTS")),
    "marine": ("marine animal segmentation", ("MAS", "marine")),
    "mirror": ("mirror detection (MSD)", ("MSD",)),
    "mirror-pmd": ("mirror detection (PMD)", ("PMD",)),
    "polyp": ("polyp segmentation", ("polyp", "Kvasir")),
}

MANIFEST = "pretrained.json"


class PretrainedError(AssistError):
    """A released model could not be fetched, verified or found."""


@dataclass(frozen=True)
class PretrainedRecord:
    """One downloaded released model, as recorded in the manifest."""

    name: str
    file: str
    sha256: str
    source: str
    size_bytes: int
    downloaded_at: float


def released_names() -> str:
    return ", ".join(f"{k} ({v[0]})" for k, v in RELEASED_MODELS.items())


def check_name(name: str) -> None:
    if name not in RELEASED_MODELS:
        raise PretrainedError(
            f"no released SAM2-UNet model called {name!r}; known: {released_names()}"
        )


def pick_file(name: str, files: list[tuple[str, str]]) -> tuple[str, str]:
    """``(file id, file name)`` of ``name``'s checkpoint among a folder listing's
    ``(id, path)`` entries: a ``.pth`` whose name holds one of the name's tokens."""
    check_name(name)
    tokens = [t.lower() for t in RELEASED_MODELS[name][1]]
    pths = [(fid, Path(path).name) for fid, path in files if path.lower().endswith(".pth")]
    for fid, fname in pths:
        if any(t in fname.lower() for t in tokens):
            return fid, fname
    raise PretrainedError(
        f"the released folder ({RELEASED_FOLDER_URL}) has no checkpoint for {name!r} "
        f"(looked for {', '.join(RELEASED_MODELS[name][1])} among {[f for _, f in pths]})"
    )


def _list_folder(timeout: float) -> list[tuple[str, str]]:
    # gdown, requests: loaded only when downloading; the backend imports this module
    import gdown
    import requests
    from gdown.exceptions import FileURLRetrievalError

    try:
        entries = gdown.download_folder(
            id=RELEASED_FOLDER_ID, skip_download=True, quiet=True, timeout=timeout
        )
    except (FileURLRetrievalError, requests.RequestException, OSError) as e:
        raise PretrainedError(
            f"cannot list the released models' folder {RELEASED_FOLDER_URL}: "
            f"{type(e).__name__}. Without internet access, download the file elsewhere and "
            "give it with --url (a local http:// server) or SAM2UNET_INIT_CHECKPOINT"
        ) from None
    return [(e.id, e.path) for e in entries or []]


def fetch_released(
    name: str,
    base_dir: str | os.PathLike[str],
    url: str | None = None,
    timeout: float = 60.0,
    quiet: bool = False,
) -> PretrainedRecord:
    """Download ``name``'s released checkpoint into ``base_dir`` (from the authors' folder, or
    from ``url`` when given), verify it by a strict load and record it with its sha256.

    Every failure (unknown name, download, corrupt or foreign file) is a
    :class:`PretrainedError` with a reason; no partial file is left behind."""
    # gdown, requests, torch: loaded only when downloading; the backend imports this module
    import gdown
    import requests
    from gdown.exceptions import DownloadCancelled, DownloadError, FileURLRetrievalError

    from sam2unet.checkpoints import load_released

    check_name(name)
    base = Path(base_dir)
    base.mkdir(parents=True, exist_ok=True)
    if url is None:
        file_id, fname = pick_file(name, _list_folder(timeout))
        url = f"https://drive.google.com/uc?id={file_id}"
    else:
        fname = f"SAM2UNet-{RELEASED_MODELS[name][1][0]}.pth"
    dest = base / fname
    tmp = base / f".{fname}.part"
    digest = hashlib.sha256()
    try:
        gdown.download(url, output=str(tmp), quiet=quiet, hasher=digest, timeout=timeout)
        if not tmp.is_file():
            raise DownloadError("nothing was written")
    except (
        FileURLRetrievalError,
        DownloadError,
        DownloadCancelled,
        requests.RequestException,
        OSError,
    ) as e:
        tmp.unlink(missing_ok=True)
        raise PretrainedError(
            f"cannot download the released {name!r} model from {url}: {type(e).__name__}: {e}"
        ) from None
    try:
        loaded = load_released(tmp)
    except CheckpointError as e:
        tmp.unlink(missing_ok=True)
        raise PretrainedError(
            f"the file downloaded from {url} is not a released SAM2-UNet checkpoint: {e}"
        ) from None
    size = loaded.config.size
    del loaded
    os.replace(tmp, dest)
    record = PretrainedRecord(
        name=name,
        file=fname,
        sha256=digest.hexdigest(),
        source=url,
        size_bytes=dest.stat().st_size,
        downloaded_at=time.time(),
    )
    _write_manifest(base, record)
    log.info("released model %r saved as %s (%s trunk, sha256 %s)", name, dest, size, record.sha256)
    return record


def read_manifest(base_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(base_dir) / MANIFEST
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        log.error("cannot read %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write_manifest(base: Path, record: PretrainedRecord) -> None:
    data = read_manifest(base)
    models = data.get("models") if isinstance(data.get("models"), dict) else {}
    models[record.name] = asdict(record)
    data = {"models": models, "latest": record.name}
    tmp = base / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, base / MANIFEST)


def find_downloaded(base_dir: str | os.PathLike[str]) -> tuple[str, Path] | None:
    """``(name, path)`` of the latest released model recorded in ``base_dir``, if its file is
    there with the recorded sha256; a missing or changed file is logged and skipped."""
    # torch (through sam2unet.checkpoints): loaded only when a first version is made
    from sam2unet.checkpoints import sha256_file

    data = read_manifest(base_dir)
    name = data.get("latest")
    entry = (data.get("models") or {}).get(name) if isinstance(name, str) else None
    if not isinstance(entry, dict):
        return None
    path = Path(base_dir) / str(entry.get("file", ""))
    if not path.is_file():
        log.error("released model %r is recorded but %s is missing; not used", name, path)
        return None
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        log.error(
            "released model %r: %s has sha256 %s..., the download recorded %s...; not used",
            name,
            path,
            digest[:12],
            str(entry.get("sha256"))[:12],
        )
        return None
    return name, path
