"""A trainer killed mid-round: no partial model becomes current, no half-written version is
listed, the round lock is freed, and the next round runs normally.

The round runs in a subprocess exactly as the trainer service runs it (``round_lock()`` around
``run_round`` on the registry, with a real Redis), on synthetic annotated samples instead of a
sync from Label Studio: the sync is covered by the end-to-end tests, and what a crash can
corrupt is the registry and the lock, which this exercises without a Label Studio.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from contracts.settings import Settings
from modelstore.registry import POINTER_KEY, ModelRegistry
from tests.support.services import ROOT, round_settings
from trainer.service import LOCK_KEY, TrainerService

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import redis

    import modelstore.registry
    from contracts.settings import Settings
    from sam2unet.synthetic import generate
    from trainer.round import run_round
    from trainer.service import TrainerService

    model_dir, redis_url, epochs, crash = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    settings = Settings(model_dir=model_dir, redis_url=redis_url, model_size="test",
                        image_size=64, device="cpu", train_epochs=epochs, train_batch_size=4,
                        train_min_samples=4, train_holdout=0.25, torch_threads=1)
    if crash == "writing":  # die in the middle of writing the candidate version
        real = modelstore.registry._write_json
        def dying(path, data):
            if path.name == "meta.json":
                print("dying while writing", path.parent, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        modelstore.registry._write_json = dying
    service = TrainerService(settings, redis.Redis.from_url(redis_url), None, None)
    service.round_lock_ttl = 2.0
    samples = [(i + 1, img, m) for i, (img, m) in enumerate(generate(8, 64, seed=3))]
    def progress(event):
        print("progress", event.kind, event.epoch, flush=True)
    with service.round_lock():
        print("locked", flush=True)
        report = run_round(service.registry, settings, samples, ["object"], project=1,
                           progress=progress)
    print("finished", report.status, flush=True)
    """
)


def start_round(tmp: Path, model_dir: Path, redis_url: str, epochs: int, crash: str):
    script = tmp / "round.py"
    script.write_text(SCRIPT)
    log = open(tmp / f"round-{crash}.log", "w+b")  # noqa: SIM115
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(model_dir), redis_url, str(epochs), crash]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def wait_for(proc, log, text: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.seek(0)
        out = log.read().decode(errors="replace")
        if text in out or proc.poll() is not None:
            return out
        time.sleep(0.05)
    raise TimeoutError(f"no {text!r}:\n{out[-2000:]}")


def version_dirs(registry: ModelRegistry) -> set[str]:
    return {d.name for d in registry.versions_dir.iterdir()}


@pytest.fixture
def registry_copy(model_dir, tmp_path, redis_url):
    d = tmp_path / "models"
    shutil.copytree(model_dir, d)
    return ModelRegistry(d, redis.Redis.from_url(redis_url))


def assert_untouched(registry: ModelRegistry, current: str, listed: list[str]) -> None:
    assert registry.current() == current
    assert registry.redis.get(POINTER_KEY).decode() == current
    assert registry.promotions()[-1]["version"] == current
    assert [v.name for v in registry.versions()] == listed
    for name in listed:  # every listed version is complete and loads
        assert registry.model_path(name).is_file()
        registry.load(name)


@pytest.mark.parametrize("crash", ["training", "writing"])
def test_trainer_killed_mid_round(registry_copy, redis_url, tmp_path, crash):
    registry = registry_copy
    current = registry.current()
    listed = [v.name for v in registry.versions()]
    proc, log = start_round(
        tmp_path, registry.model_dir, redis_url, 40 if crash == "training" else 1, crash
    )
    try:
        if crash == "training":
            out = wait_for(proc, log, "progress epoch 1")
            assert "progress epoch 1" in out, out[-3000:]
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
        log.seek(0)
        out = log.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert "locked" in out and "finished" not in out, out[-3000:]
    if crash == "writing":
        assert "dying while writing" in out
        leftovers = version_dirs(registry) - set(listed)
        assert leftovers and all(n.startswith(".tmp-") for n in leftovers), leftovers
    assert_untouched(registry, current, listed)

    # the lock of the dead trainer expires by itself (TTL 2 s here, renewed while alive)
    service = TrainerService(
        round_settings(registry.model_dir, active_learning=True),
        registry.redis,
        None,
        None,
    )
    t0 = time.monotonic()
    deadline = t0 + 10
    while registry.redis.exists(LOCK_KEY) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not registry.redis.exists(LOCK_KEY)
    freed_after = time.monotonic() - t0

    # the next round runs normally and writes the next version number
    from sam2unet.synthetic import generate
    from trainer.round import run_round

    samples = [(i + 1, img, m) for i, (img, m) in enumerate(generate(8, 64, seed=3))]
    with service.round_lock():
        report = run_round(service.registry, service.settings, samples, ["object"], project=1)
    assert report.status in ("promoted", "rejected"), report
    assert report.parent == current
    new = registry.get(report.candidate)
    assert new.number == max(v.number for v in registry.versions() if v.name != new.name) + 1
    assert [v.name for v in registry.versions()] == [*listed, report.candidate]
    expected = report.candidate if report.status == "promoted" else current
    assert registry.current() == expected
    print(f"\nkilled while {crash}: lock free {freed_after:.1f}s later; next round {report.status}")


def test_round_lock_is_renewed_while_the_round_runs(redis_url, tmp_path):
    conn = redis.Redis.from_url(redis_url)
    service = TrainerService(Settings(model_dir=tmp_path), conn, None, None)
    service.round_lock_ttl = 0.6
    other = TrainerService(Settings(model_dir=tmp_path), conn, None, None)
    with service.round_lock():
        time.sleep(2.0)  # three TTLs: held only because it is renewed
        assert conn.exists(LOCK_KEY)
        lock = other.redis.lock(LOCK_KEY, timeout=1)
        assert not lock.acquire(blocking=False)
    assert not conn.exists(LOCK_KEY)  # released at the end
