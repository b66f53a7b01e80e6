"""Starting the processes of a data-parallel run: the devices of this machine's processes
(:func:`parse_devices`), a run over several machines (:class:`Cluster`), torch's elastic
launcher (:func:`launch`) with a :class:`Relay` for progress and stop requests, and joining a
process group that ``torchrun`` set up (:func:`joined_from_torchrun`). See
:mod:`sam2unet.distributed` for what makes N processes train like one."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from sam2unet.exceptions import ConfigError, Sam2UnetError

log = logging.getLogger(__name__)


class DistributedRunError(Sam2UnetError):
    """A process of a data-parallel run failed or died; the run produced nothing."""


@dataclass(frozen=True)
class DevicePlan:
    """The devices of a run's processes on this machine, one per process (local rank)."""

    devices: tuple[str, ...]

    @property
    def nprocs(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].startswith("cuda") else "gloo"


@dataclass(frozen=True)
class Cluster:
    """A run over several machines: each machine's launcher starts its own processes and they
    meet at the c10d rendezvous ``endpoint`` (``host:port``), which the machine with ``host``
    true serves. ``join_timeout``: seconds to wait for all ``nodes`` machines. ``local_addr``:
    the address the other machines reach this one at (default: its host name)."""

    nodes: int
    endpoint: str
    run_id: str
    host: bool
    join_timeout: float = 600.0
    local_addr: str | None = None


def parse_endpoint(spec: str, default_port: int = 29400) -> tuple[str, int]:
    """``host:port`` (or ``host``) of a rendezvous; raises :class:`ConfigError`."""
    host, sep, port = spec.strip().rpartition(":")
    if not sep:
        host, port = spec.strip(), str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"rendezvous endpoint {spec!r}: use host:port, e.g. 10.0.0.5:29400")
    return host, int(port)


def parse_devices(spec: str | None) -> DevicePlan | None:
    """The processes ``spec`` asks for (see the module docstring); ``None``: one process on the
    single device, as before. Raises :class:`ConfigError` for anything else."""
    s = (spec or "").strip().lower()
    if s in ("", "1", "single"):
        return None
    if s == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return DevicePlan(tuple(f"cuda:{i}" for i in range(n))) if n >= 2 else None
    if s.startswith("cpu:"):
        count = s[4:]
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"train devices {spec!r}: cpu:N needs a process count N >= 1")
        return DevicePlan(("cpu",) * int(count))
    parts = [p.strip() for p in s.split(",") if p.strip()]
    if not parts or not all(p.startswith("cuda:") and p[5:].isdigit() for p in parts):
        raise ConfigError(
            f"train devices {spec!r}: use auto, cpu:N or a list of GPUs such as cuda:0,cuda:1"
        )
    if len(set(parts)) != len(parts):
        raise ConfigError(f"train devices {spec!r}: a GPU is listed twice")
    return DevicePlan(tuple(parts))


def torchrun_env() -> bool:
    """Whether this process was started by ``torchrun`` (or another elastic agent)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def joined_from_torchrun() -> torch.device:
    """Join the process group ``torchrun`` set up (env:// rendezvous) and return this rank's
    device: ``cuda:LOCAL_RANK`` with GPUs, else the CPU (gloo)."""
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")
    return device


class Relay:
    """Progress and stop requests between the launching process and its ranks: rank 0's
    ``progress`` events reach the launcher's callback, the launcher's ``should_stop`` reaches
    every rank (which then agree on it, see
    :func:`~sam2unet.distributed.collectives.all_agree`)."""

    def __init__(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self._events = ctx.Queue()
        self._failures = ctx.Queue()
        self._stop = ctx.Event()

    def progress(self, event: Any) -> None:
        self._events.put(event)

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def failed(self, rank: int, error: BaseException) -> None:
        """A rank's exception, reported before the rank exits."""
        self._failures.put((time.time(), rank, f"{type(error).__name__}: {error}"))

    def failures(self) -> list[str]:
        """The exceptions ranks reported, first first (the first is usually the cause: the
        others see their peers go)."""
        out = []
        while True:
            try:
                out.append(self._failures.get(timeout=0.5))
            except (queue.Empty, EOFError, OSError):
                return [f"rank {rank}: {text}" for _, rank, text in sorted(out)]

    @contextlib.contextmanager
    def serving(
        self,
        progress: Callable[[Any], None] | None,
        should_stop: Callable[[], bool] | None,
    ):
        """In the launcher, while the ranks run: a thread hands events to ``progress`` and
        passes a true ``should_stop`` on."""
        done = threading.Event()

        def pump() -> None:
            while True:
                try:
                    event = self._events.get(timeout=0.2)
                except queue.Empty:
                    if done.is_set():
                        return
                    event = None
                except (EOFError, OSError):
                    return
                if event is not None and progress is not None:
                    try:
                        progress(event)
                    except Exception:  # a failing reporter must not stop the run
                        log.exception("progress callback failed")
                if should_stop is not None and not self._stop.is_set() and should_stop():
                    self._stop.set()

        thread = threading.Thread(target=pump, name="ranks-relay", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join(timeout=10)


def leave() -> None:
    """Leave the process group joined with :func:`joined_from_torchrun` (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@record  # a rank's exception reaches the launcher's error report
def _rank_entry(
    fn: Callable[..., Any],
    plan: DevicePlan,
    threads: int,
    log_level: int,
    relay: Relay,
    args: tuple[Any, ...],
) -> Any:
    """Runs in every launched process: join the group, pin the device, call
    ``fn(device, relay, *args)``."""
    local = int(os.environ["LOCAL_RANK"])
    logging.basicConfig(
        level=log_level if local == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s rank{os.environ.get('RANK', local)} %(name)s: "
        "%(message)s",
    )
    device = torch.device(plan.devices[local])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if threads > 0:
        torch.set_num_threads(threads)
    dist.init_process_group(plan.backend, init_method="env://")
    try:
        return fn(device, relay, *args)
    except BaseException as e:
        relay.failed(int(os.environ.get("RANK", local)), e)
        raise
    finally:
        dist.destroy_process_group()


def _failure_text(message: Any) -> str:
    if isinstance(message, dict):  # an error file written by @record
        message = message.get("message", message)
    return str(message).strip()


def launch(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    plan: DevicePlan,
    threads: int = 0,
    progress: Callable[[Any], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    run_id: str | None = None,
    cluster: Cluster | None = None,
) -> Any:
    """Run ``fn(device, relay, *args)`` in ``plan.nprocs`` processes on this machine (torch's
    elastic launcher, c10d rendezvous on a free local port, no restarts) and return rank 0's
    result. ``relay`` (a :class:`Relay`) carries rank 0's events to ``progress`` and
    ``should_stop`` to the ranks.

    With ``cluster``, these processes are this machine's share of a run over
    ``cluster.nodes`` machines, each running this function with the same ``cluster`` (but its
    own ``host`` flag and ``plan``): the result is that of the lowest global rank on this
    machine (``fn`` decides what each rank returns), ``progress`` gets events only where rank 0
    runs, and ``should_stop`` stops the whole run.

    ``fn`` and ``args`` must be picklable (processes are spawned); tensors in ``args`` arrive
    in shared memory, the same storage for every rank, so ``fn`` copies a model before
    training it. ``threads``: torch CPU
    threads per process (0: this machine's cores divided among the processes). A process that
    fails or dies stops the others and raises :class:`DistributedRunError`.
    """
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // plan.nprocs)
    nodes = cluster.nodes if cluster is not None else 1
    config = LaunchConfig(
        min_nodes=nodes,
        max_nodes=nodes,
        nproc_per_node=plan.nprocs,
        run_id=cluster.run_id if cluster else run_id or f"sam2unet-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint=cluster.endpoint if cluster else "localhost:0",
        rdzv_configs=(
            {"join_timeout": cluster.join_timeout, "is_host": cluster.host} if cluster else {}
        ),
        local_addr=cluster.local_addr if cluster else None,
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    where = f" (run {config.run_id}: {nodes} machines at {config.rdzv_endpoint})" if cluster else ""
    log.info(
        "starting %d %s process(es) on %s%s",
        plan.nprocs,
        plan.backend,
        ",".join(plan.devices),
        where,
    )
    relay = Relay()
    try:
        with relay.serving(progress, should_stop):
            results = elastic_launch(config, _rank_entry)(
                fn, plan, threads, logging.getLogger().getEffectiveLevel(), relay, args
            )
    except RendezvousError as e:
        waited = f" within {cluster.join_timeout:.0f} s" if cluster else ""
        detail = f": {e}" if str(e).strip() else ""
        raise DistributedRunError(
            f"the {nodes} machines of run {config.run_id} did not meet at "
            f"{config.rdzv_endpoint}{waited} ({type(e).__name__}{detail}); is a train agent "
            "running on each other machine, with this address reachable?"
        ) from None
    except ChildFailedError as e:
        reported = relay.failures()
        exits = [
            f"rank {rank} exited with code {f.exitcode}: {_failure_text(f.message)}"
            for rank, f in sorted(e.failures.items())
        ]
        raise DistributedRunError(
            "a training process failed: " + "; ".join([*reported, *exits])
        ) from None
    return results[min(results)]
