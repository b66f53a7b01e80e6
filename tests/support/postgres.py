"""A throwaway PostgreSQL server for a Label Studio under test or benchmark (production Label
Studio runs on PostgreSQL): the distribution's PostgreSQL binaries (Debian's ``postgresql``
package: ``apt-get install postgresql``), a fresh cluster in a temporary directory, listening on
127.0.0.1 at a free port with trust authentication, stopped and deleted on exit.

PostgreSQL refuses to run as root: as root, the cluster is made and run as the ``postgres``
user that the package creates."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from launcher.redis_server import free_port

logger = logging.getLogger(__name__)


def postgres_bin() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


@contextlib.contextmanager
def running_postgres() -> Iterator[dict[str, str]]:
    """Start a fresh cluster; yields Label Studio's environment for it (``DJANGO_DB`` and the
    ``POSTGRE_*`` variables)."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    as_user: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="sam2unet-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(work, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = work / "data", free_port()
    try:
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        opts = f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(work / "log"),
             "-o", opts, "-w", "-t", "120", "start"],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        logger.info("PostgreSQL on 127.0.0.1:%d (%s)", port, data)
        yield {
            "DJANGO_DB": "postgresql",
            "POSTGRE_HOST": "127.0.0.1",
            "POSTGRE_PORT": str(port),
            "POSTGRE_USER": "postgres",
            "POSTGRE_PASSWORD": "unused-with-trust",
            "POSTGRE_NAME": "postgres",
        }
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True, timeout=120,
        )  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
