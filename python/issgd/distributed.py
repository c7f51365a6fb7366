"""The distributed scoring driver, on torch.distributed (docs/design.md, "Distributed scoring").

Rank 0 is the master (it trains); ranks 1..W are scoring workers, each owning the shard of
examples ``shard_of(rank)``. Start-up: every worker connects to the key-value store (``ScoringPool.spawn``'s
own, listening on 127.0.0.1 only; under ``torchrun``, torchrun's, through the ``env://`` rendezvous), builds
its data and model, checks that its model has the master's parameter layout and sets its ready key; the
master waits at most ``startup_timeout`` seconds for all of them and raises ``StartupError`` naming the
worker that exited or never arrived. Then the master and each worker open a two-rank process group over
the same store (gloo; NCCL when every rank has a GPU of its own), the parameter channel of that worker.
After that nothing waits for anybody:

* every K steps the master packs its parameters and their version (the master step) into one flat buffer
  and posts an asynchronous broadcast of it on the channel of every worker whose previous push has
  completed (a worker still taking in the previous one, because it is stopped or hung, is skipped: it gets
  newer parameters next time); it never waits on a push;
* a worker keeps a receive posted on its channel at all times (a thread reposts it as soon as a push has
  arrived, alternating between two buffers), so pushes land as soon as they are posted; before each chunk
  it copies the newest parameters that have arrived into its model, scores the chunk with
  ``GradNormScorer`` and ``queue_push``es (indices, norms, version); once its whole shard is scored with
  the current parameters it sleeps until newer ones arrive;
* the master drains the queue without blocking (``queue_len`` then ``queue_pop``) when it refreshes,
  validates every message (rank, version, index range and shard, finite non-negative norms) and logs and
  drops a bad one;
* while the master runs diagnostics or writes a checkpoint, spawned workers are frozen (SIGSTOP/SIGCONT)
  and torchrun's see the pause key and start no new chunk, so staleness and scoring throughput count
  training time only.

Parameters travel on a process group because the store takes at most 8 MiB in one value (2.1 M float32
parameters) and is slow for large ones. Each worker has a group of its own so that one that dies or hangs
affects only its channel: the master sees its push fail or stay in flight, logs a warning and keeps
training; that shard's weights age. The store lives in the master's process (or in torchrun's agent).
(Under torchrun, the agent itself tears the job down when a worker process exits with an error;
``--workers W``, which spawns the workers itself, keeps training.)
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import tempfile
import threading
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from issgd.scoring import ChunkCursor, ScoreResult, shard_of

log = logging.getLogger("issgd")

KEY_LAYOUT = "issgd/layout"  # the master's parameter layout (ParameterLayout.describe), checked by every worker
KEY_TRANSPORT = "issgd/transport"  # the backend of the parameter channels: "gloo" or "nccl"
KEY_GIVEN_UP = "issgd/given_up/"  # + rank: set when the master has given up that worker's channel
CHANNEL = "issgd/channel/"  # + rank: store prefix of that worker's two-rank parameter channel
KEY_STOP = "issgd/stop"
KEY_PAUSE = "issgd/pause"  # "1" while the master runs diagnostics or writes a checkpoint
KEY_READY = "issgd/ready/"  # + rank: set by a worker once it has its data and model, to the channels it can use
QUEUE = "issgd/scores"
# A worker with nothing to do re-reads its control keys (stop, pause, given up) this often: 150 small
# requests/s per idle worker, negligible for the store thread in the master's process.
POLL_SECONDS = 0.02
# Workers run at lower CPU priority so that, when cores are short, scoring yields to training.
WORKER_NICE = 10
# How long a push may stay in flight before its channel is given up. Workers always have a receive posted,
# so only a push to a worker that is stopped or hung lasts; this also bounds how long the master's exit can
# wait for such a worker under torchrun (spawned ones are killed).
PUSH_TIMEOUT = timedelta(minutes=30)
# A worker's standing receive waits for the next push however long training pauses (diagnostics,
# checkpoints); it ends when the master closes the channel or dies.
RECEIVE_TIMEOUT = timedelta(days=7)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_scoring_rank() -> bool:
    """Under torchrun, ranks 1.. score; rank 0 trains."""
    return launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0


def rank_device(device: str, rank: int) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
    return dev


class StartupError(RuntimeError):
    """The scoring workers did not all come up: one exited, or one did not report ready in time."""


MAIN_GUARD = ("the script that starts training has no `if __name__ == \"__main__\":` guard: spawned workers re-run "
              "it when they start (multiprocessing's spawn start method); put the code that starts training "
              "(ImportanceSampler or issgd.fit with workers, Trainer(...).run()) under that guard")
# Set by the master before it spawns workers: a spawned child that re-runs an unguarded script writes there.
BOOTSTRAP_REPORT = "ISSGD_BOOTSTRAP_REPORT"


def refuse_in_bootstrap() -> None:
    """Raise StartupError (and tell the master why, through BOOTSTRAP_REPORT) when called while a spawned
    child is still importing its parent's main module, i.e. from a script without a main guard."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        report = os.environ.get(BOOTSTRAP_REPORT)
        if report:
            try:
                with open(report, "w") as f:
                    f.write("main-guard\n")
            except OSError:
                pass
        raise StartupError(MAIN_GUARD)


def loopback_store(timeout_s: float) -> tuple[dist.TCPStore, int]:
    """The key-value store's server, listening on 127.0.0.1 only. (torch's TCPStore server binds every
    interface whatever its host argument, so it is handed a socket already bound to the loopback address.)"""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # The store takes over the socket bound above; its libuv backend does so from torch 2.8 on, before
    # that only the older backend does (it would otherwise listen on every interface).
    legacy = {} if torch.__version__ >= (2, 8) else {"use_libuv": False}
    store = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=sock.detach(), **legacy)
    return store, port


def connect(rank: int, world_size: int, timeout_s: float = 300.0) -> dist.Store:
    """A worker's (or a torchrun master's) connection to the shared key-value store: spawned workers reach
    the master's loopback store at MASTER_ADDR:MASTER_PORT; under torchrun every rank goes through
    torchrun's rendezvous (``env://``)."""
    if launched_by_torchrun():
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timedelta(seconds=timeout_s)))
    else:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                              timedelta(seconds=timeout_s))
    store.set_timeout(timedelta(seconds=timeout_s))
    return store


# ---------------------------------------------------------------------- the parameter transport
ALIGN = 64  # bytes: every tensor starts aligned, so its slice of the byte buffer can be viewed as its dtype


class ParameterLayout:
    """Where each tensor of a model's state (parameters and buffers) lies in one flat byte buffer, after a
    header whose first 8 bytes hold the version. Master and workers build the same model, so only the bytes
    travel (no shapes, no pickles); ``describe()`` lets a worker check that it did."""

    def __init__(self, model: torch.nn.Module):
        self.entries = []  # (name, offset, nbytes, dtype, shape)
        offset = ALIGN
        for name, t in model.state_dict().items():
            nbytes = t.numel() * t.element_size()
            self.entries.append((name, offset, nbytes, t.dtype, tuple(t.shape)))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.nbytes = offset

    def describe(self) -> str:
        names = ";".join(f"{n}:{str(d).removeprefix('torch.')}:{list(s)}" for n, _, _, d, s in self.entries)
        return f"{self.nbytes} bytes in {len(self.entries)} tensors (crc32 {zlib.crc32(names.encode()):08x})"

    def buffer(self, device: torch.device | str = "cpu", *, pin: bool = False) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin)

    def pack(self, model: torch.nn.Module, version: int, buf: torch.Tensor) -> None:
        state = model.state_dict()
        with torch.no_grad():
            buf[:8].view(torch.int64).fill_(version)
            for name, offset, nbytes, dtype, shape in self.entries:
                if nbytes:
                    buf[offset:offset + nbytes].view(dtype).view(shape).copy_(state[name])

    def unpack(self, buf: torch.Tensor, model: torch.nn.Module) -> int:
        """Copies the parameters in ``buf`` into ``model``; returns their version."""
        if buf.numel() != self.nbytes:
            raise ValueError(f"parameter buffer of {buf.numel()} bytes does not fit this model "
                             f"({ParameterLayout(model).describe()}): master and worker built different models")
        state = model.state_dict()
        with torch.no_grad():
            for name, offset, nbytes, dtype, shape in self.entries:
                if nbytes:
                    state[name].copy_(buf[offset:offset + nbytes].view(dtype).view(shape))
        return int(buf[:8].view(torch.int64)[0])


class TransportError(ConnectionError):
    """A parameter channel failed: its peer exited, or a push stayed in flight past PUSH_TIMEOUT."""


def nccl_capable(device: torch.device, local_ranks: int) -> bool:
    """Whether this rank can use NCCL channels: a CUDA device chosen per rank (``--device cuda``, no index),
    at most as many ranks on this machine as GPUs, and a torch built with NCCL."""
    return (device.type == "cuda" and device.index is None and dist.is_available() and dist.is_nccl_available()
            and torch.cuda.is_available() and local_ranks <= torch.cuda.device_count())


def _broadcast_options(timeout: timedelta) -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, timeout
    return opts


def _finish(work, backend: str, stop: threading.Event | None = None) -> None:
    """Blocks until ``work`` has ended and raises what went wrong. NCCL's ``wait()`` only orders the current
    CUDA stream after the operation, so there the host polls ``is_completed()`` first (until ``stop`` is set)."""
    if backend == "nccl":
        while not work.is_completed() and not (stop is not None and stop.is_set()):
            time.sleep(0.001)
    work.wait()


def open_channel(store: dist.Store, worker: int, me: int, backend: str, *, loopback: bool, device: torch.device,
                 timeout: timedelta):
    """The two-rank process group that carries worker ``worker``'s parameters: the master is its rank 0, the
    worker its rank 1 (``me``). Both sides block here until the other has joined (at most ``timeout``), then
    exchange one small broadcast, so that a channel that cannot carry data fails now and NCCL's lazily created
    communicator exists before the first push (a push must never block). ``loopback``: gloo listens on
    127.0.0.1 only (spawned workers)."""
    prefixed = dist.PrefixStore(f"{CHANNEL}{worker}/", store)
    if backend == "nccl":
        if device.index is not None:  # a worker's own GPU (the master's is the current device)
            torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = PUSH_TIMEOUT
        group = dist.ProcessGroupNCCL(prefixed, me, 2, opts)
    else:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._threads = 1  # one push at a time on a channel
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if loopback
                         else dist.ProcessGroupGloo.create_default_device()]
        group = dist.ProcessGroupGloo(prefixed, me, 2, opts)
    probe = torch.zeros(1, device=device if backend == "nccl" else "cpu")
    _finish(group.broadcast([probe], _broadcast_options(timeout)), backend)
    return group


class ParameterPusher:
    """The master's end of the parameter transport. ``push`` never waits: it retires the pushes that have
    completed, packs the parameters once and posts an asynchronous broadcast on the channel of every worker
    whose previous push has completed; a worker whose push is still in flight is skipped. A channel whose
    push failed, or whose worker exited with a push in flight, is given up, and its worker told so through the
    store."""

    def __init__(self, store: dist.Store, layout: ParameterLayout, backend: str, device: torch.device):
        self.store = store
        self.layout = layout
        self.backend = backend
        # NCCL pushes from the GPU; gloo from host memory (pinned, so copies from a GPU are fast).
        self.buffer_device = device if backend == "nccl" else torch.device("cpu")
        self._pin = backend == "gloo" and device.type == "cuda"
        self.channels: dict[int, object] = {}
        self.posted: dict[int, int] = {}  # pushes posted per worker
        self.in_flight: dict[int, tuple[object, torch.Tensor]] = {}  # worker -> (Work, the buffer it sends)
        self.lost: dict[int, str] = {}  # worker -> why its channel was given up
        self._buffers: list[torch.Tensor] = []
        self._opts = _broadcast_options(PUSH_TIMEOUT)
        self.seconds = 0.0  # master time spent in push()
        self.refreshes = 0  # push() calls
        self.pushes = 0  # push() calls that packed and posted (some worker was free)
        self.sent = 0  # broadcasts posted (one per worker per push)
        self.skipped = 0  # sends skipped because the worker's previous push was still in flight

    def connect(self, worker: int, *, loopback: bool, timeout: timedelta) -> None:
        self.channels[worker] = open_channel(self.store, worker, 0, self.backend, loopback=loopback,
                                             device=self.buffer_device, timeout=timeout)
        self.posted[worker] = 0

    def poll(self) -> list[tuple[int, str]]:
        """Retires the pushes that have completed; returns (worker, reason) for each one that failed."""
        failed = []
        for worker, (work, _) in list(self.in_flight.items()):
            if not work.is_completed():
                continue
            del self.in_flight[worker]
            try:
                work.wait()  # complete already: returns at once, or raises what went wrong with the transfer
            except Exception as exc:  # noqa: BLE001  (whatever the failure, that channel is done for)
                self._give_up(worker, _one_line(exc))
                failed.append((worker, self.lost[worker]))
        return failed

    def give_up(self, worker: int, why: str) -> None:
        """No more pushes to ``worker`` (its process exited). A push still in flight to a worker that was
        stopped when it was posted may never end (gloo does not fail it when the connection closes), so its
        channel is set aside for good (see _keep_until_exit)."""
        if worker in self.in_flight:
            self._set_aside(worker)
        self._give_up(worker, why)

    def _set_aside(self, worker: int) -> None:
        channel, (work, buf) = self.channels.pop(worker), self.in_flight.pop(worker)
        if self.backend == "nccl":
            channel.abort()
        else:
            _keep_until_exit(channel, work, buf)

    def _give_up(self, worker: int, why: str) -> None:
        self.lost[worker] = why
        try:
            self.store.set(f"{KEY_GIVEN_UP}{worker}", why)
        except Exception:  # noqa: BLE001  (telling the worker is a courtesy: it may be gone)
            pass

    def push(self, model: torch.nn.Module, version: int) -> tuple[list[int], list[tuple[int, str]]]:
        """Posts the parameters of ``version`` to every free worker; returns those workers and (worker, reason)
        for each push found to have failed."""
        t0 = time.perf_counter()
        failed = self.poll()
        live = [w for w in self.channels if w not in self.lost]
        free = [w for w in live if w not in self.in_flight]
        self.skipped += len(live) - len(free)
        if free:
            buf = self._free_buffer()
            self.layout.pack(model, version, buf)
            for worker in free:
                self.in_flight[worker] = (self.channels[worker].broadcast([buf], self._opts), buf)
                self.posted[worker] += 1
            self.pushes += 1
            self.sent += len(free)
        self.refreshes += 1
        self.seconds += time.perf_counter() - t0
        return free, failed

    def _free_buffer(self) -> torch.Tensor:
        """A buffer no push in flight reads from, new if need be (a worker that is stopped or hung holds the
        buffer of its push until that push ends); buffers no push reads from any more are dropped."""
        busy = {id(buf) for _, buf in self.in_flight.values()}
        free = [b for b in self._buffers if id(b) not in busy]
        buf = free[0] if free else self.layout.buffer(self.buffer_device, pin=self._pin)
        self._buffers = [b for b in self._buffers if id(b) in busy] + [buf]
        return buf

    def stats(self, train_seconds: float) -> dict:
        """Push cost for summary.json: master time per refresh, parameter megabytes packed and posted per second
        of that time, and its share of the training time."""
        return {"push_backend": self.backend, "push_bytes": self.layout.nbytes, "pushes": self.pushes,
                "push_skipped": self.skipped, "push_seconds": self.seconds,
                "push_ms_per_refresh": 1e3 * self.seconds / self.refreshes if self.refreshes else None,
                "push_mb_per_second": (self.layout.nbytes * self.pushes / self.seconds / 1e6
                                       if self.seconds else None),
                "push_fraction": self.seconds / train_seconds if train_seconds else None}

    def release_idle(self) -> None:
        """Closes the channels that have no push in flight: the workers' standing receives end at once, so
        they can exit."""
        self.poll()
        for worker in [w for w in self.channels if w not in self.in_flight]:
            del self.channels[worker]

    def close(self, grace: float = 2.0) -> None:
        """Closes every channel once its push in flight has ended, waiting at most ``grace`` seconds (a push
        to a worker that was just stopped fails as soon as its connection closes); a channel whose push is
        still in flight then is set aside for good (see _keep_until_exit), an NCCL one aborted."""
        deadline = time.monotonic() + grace
        self.release_idle()
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
            self.release_idle()
        for worker in list(self.in_flight):
            self._set_aside(worker)
        self.channels.clear()
        self._buffers.clear()


def _keep_until_exit(*objects) -> None:
    """Destroying a gloo channel joins its thread, which waits for the channel's operation in flight; a push
    to a worker that is stopped or died while stopped may never end, so such a channel (with its Work and
    buffer) is leaked on purpose, so that neither ``close()`` nor the interpreter's exit waits for it."""
    for obj in objects:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    _SET_ASIDE.append(objects)


_SET_ASIDE: list = []  # what _keep_until_exit leaked (for inspection)


class ParameterReceiver:
    """A worker's end of the parameter transport. A thread keeps a receive posted on the channel, alternating
    between two buffers, so a push lands as soon as the master posts it; ``take`` copies the newest push that
    has arrived into the model (between chunks), and never while the thread may write into that buffer."""

    def __init__(self, store: dist.Store, rank: int, layout: ParameterLayout, backend: str, device: torch.device,
                 *, loopback: bool, timeout: timedelta):
        self.layout = layout
        self.backend = backend
        device = device if backend == "nccl" else torch.device("cpu")
        self.channel = open_channel(store, rank, 1, backend, loopback=loopback, device=device, timeout=timeout)
        self._buffers = [layout.buffer(device), layout.buffer(device)]
        self._newest: int | None = None  # the buffer holding the newest push not taken yet
        self._taking: int | None = None  # the buffer ``take`` is copying from
        self._error: str | None = None
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self.received = 0
        self._thread = threading.Thread(target=self._receive, name=f"issgd-receive-{rank}", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        slot, opts = 0, _broadcast_options(RECEIVE_TIMEOUT)
        try:
            if self.backend == "nccl":
                torch.cuda.set_device(self._buffers[0].device)  # a new thread starts on GPU 0
            while True:
                # Blocks this thread only (gloo's wait releases the GIL).
                _finish(self.channel.broadcast([self._buffers[slot]], opts), self.backend, self._closing)
                if self._closing.is_set():
                    return
                with self._cond:
                    self._newest, self.received, slot = slot, self.received + 1, 1 - slot
                    while self._taking == slot:
                        self._cond.wait()
        except Exception as exc:  # noqa: BLE001  (the master closed the channel, exited or gave up on it)
            with self._cond:
                self._error = _one_line(exc)

    def take(self, model: torch.nn.Module) -> int | None:
        """The version of the parameters now in ``model``, or None when no newer push has arrived."""
        with self._cond:
            slot = self._newest
            if slot is None:
                if self._error is not None:
                    raise TransportError(f"the parameter channel closed: {self._error}")
                return None
            self._newest, self._taking = None, slot
        try:
            return self.layout.unpack(self._buffers[slot], model)
        finally:
            with self._cond:
                self._taking = None
                self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Waits (at most ``timeout`` seconds) for the standing receive to end; the master closes its end of
        the channel when it stops the workers. An NCCL receive is aborted (NCCL does not see its peer go)."""
        self._closing.set()
        if self.backend == "nccl":
            self.channel.abort()
        self._thread.join(timeout)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


class ScoringPool:
    """The master's side of the driver: publish parameters, collect norms, watch worker health."""

    def __init__(self, store: dist.Store, workers: int, *, processes=None, worker_timeout: float = 60.0,
                 startup_timeout: float = 120.0, examples: int | None = None, bootstrap_report: str | None = None,
                 device: torch.device | str = "cpu"):
        self.store = store
        self.workers = workers
        self.device = torch.device(device)
        self.processes = processes  # multiprocessing.Process list when we spawned them ourselves
        self.worker_timeout = worker_timeout
        self.startup_timeout = startup_timeout
        self.examples = examples  # N: results are checked against it
        self.bootstrap_report = bootstrap_report
        self.port: int | None = None
        self.published_version = -1
        self.layout: ParameterLayout | None = None
        self.pusher: ParameterPusher | None = None
        self.sync_seconds = 0.0  # master time spent publishing and collecting
        self.results = 0
        self.rejected = 0  # messages dropped by validation
        self.scored_examples = 0
        self.worker_seconds = {r: 0.0 for r in range(1, workers + 1)}
        # worker -> (version of the first push it has not answered yet, when that push was posted)
        self._waiting: dict[int, tuple[int, float] | None] = {r: None for r in range(1, workers + 1)}
        self._warned: set[tuple[str, int]] = set()
        self._closed = False
        self.error_files: list[str] = []

    # ---------------------------------------------------------------- start-up
    @classmethod
    def spawn(cls, job: bytes, workers: int, device: str, *, startup_timeout: float = 120.0, **kwargs) -> ScoringPool:
        """Start ``workers`` scoring processes on this machine and become rank 0; the store listens on
        127.0.0.1 only. ``job`` is the pickled ``issgd.job.WorkerJob`` each worker builds; ``device`` the
        device spec the workers' devices derive from (``rank_device``)."""
        refuse_in_bootstrap()
        store, port = loopback_store(max(startup_timeout, 60.0))
        fd, report = tempfile.mkstemp(prefix="issgd-bootstrap-")
        os.close(fd)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(workers + 1), RANK="0")
        os.environ[BOOTSTRAP_REPORT] = report
        try:
            # The job travels as bytes: torch's multiprocessing pickler would move the tensors of a model or
            # data set into shared memory, in place, so that a worker's writes would reach the master's copy.
            ctx = mp.start_processes(worker_entry, args=(str(device), job), nprocs=workers, join=False,
                                     start_method="spawn")
        finally:
            os.environ.pop(BOOTSTRAP_REPORT, None)
        pool = cls(store, workers, processes=ctx.processes, startup_timeout=startup_timeout,
                   bootstrap_report=report, device=device, **kwargs)
        pool.port = port
        pool.error_files = ctx.error_files  # where a worker's exception goes (torch's spawn wrapper writes it)
        return pool

    @classmethod
    def from_torchrun(cls, device: torch.device, *, startup_timeout: float = 120.0, **kwargs) -> ScoringPool:
        world_size = int(os.environ["WORLD_SIZE"])
        return cls(connect(0, world_size, startup_timeout), world_size - 1, startup_timeout=startup_timeout,
                   device=device, **kwargs)

    def start(self, model: torch.nn.Module, version: int) -> None:
        """Wait (at most ``startup_timeout`` seconds) until every worker has reported ready, open the
        parameter channels and push the first parameters; a worker that exits or never reports raises
        StartupError."""
        self.layout = ParameterLayout(model)
        self.store.set(KEY_LAYOUT, self.layout.describe())  # workers check their model against it
        deadline = time.monotonic() + self.startup_timeout
        waiting = set(range(1, self.workers + 1))
        while True:
            waiting = {r for r in waiting if not self.store.check([f"{KEY_READY}{r}"])}
            if not waiting:
                break
            self._check_startup_deaths()
            if time.monotonic() > deadline:
                ranks = ", ".join(map(str, sorted(waiting)))
                raise StartupError(f"scoring worker(s) {ranks} did not report ready within {self.startup_timeout:g} s "
                                   "(--startup-timeout); a worker that is stopped, hung or still loading its data "
                                   "never arrived")
            time.sleep(0.05)
        self._open_channels(deadline)
        self._cleanup_report()
        self.publish(model, version)

    def _check_startup_deaths(self) -> None:
        for i, proc in enumerate(self.processes or []):
            if not proc.is_alive():
                raise StartupError(self._startup_death(i + 1, proc.exitcode))

    def _open_channels(self, deadline: float) -> None:
        """NCCL channels when every rank (this one included) can use them, gloo otherwise; one per worker."""
        ranks = range(1, self.workers + 1)
        local = self.workers + 1 if self.processes is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        offers = [self.store.get(f"{KEY_READY}{r}").decode() for r in ranks]
        nccl = nccl_capable(self.device, local) and all(o == "nccl" for o in offers)
        backend = "nccl" if nccl else "gloo"
        self.store.set(KEY_TRANSPORT, backend)
        self.pusher = ParameterPusher(self.store, self.layout, backend, self.device)
        for r in ranks:
            timeout = timedelta(seconds=max(10.0, deadline - time.monotonic()))
            try:
                self.pusher.connect(r, loopback=self.processes is not None, timeout=timeout)
            except Exception as exc:  # noqa: BLE001  (whatever went wrong, the worker's channel is not there)
                self._check_startup_deaths()
                raise StartupError(f"scoring worker {r} did not open its parameter channel ({backend}) within "
                                   f"{timeout.total_seconds():.0f} s: {_one_line(exc)}") from None
        log.info("parameter channels: %s, %d workers, %.1f MB per push", backend, self.workers,
                 self.layout.nbytes / 1e6)

    def _startup_death(self, rank: int, exitcode: int | None) -> str:
        how = (f"killed by {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0
               and -exitcode in signal.valid_signals() else f"exit code {exitcode}")
        reason = ""
        if self.bootstrap_report and os.path.exists(self.bootstrap_report):
            with open(self.bootstrap_report) as f:
                if f.read().strip() == "main-guard":
                    reason = f": {MAIN_GUARD}"
        if not reason and exitcode is not None and exitcode > 0:
            error = self.worker_error(rank)
            reason = f": {error}" if error else " (its traceback is above, on stderr)"
        self._cleanup_report()
        return f"scoring worker {rank} exited during start-up ({how}){reason}"

    def worker_error(self, rank: int) -> str | None:
        """The last line of the exception a spawned worker exited with (None if it left none)."""
        try:
            with open(self.error_files[rank - 1], "rb") as f:
                trace = pickle.load(f)  # a string, written by torch.multiprocessing's wrapper in our child
        except (AttributeError, IndexError, TypeError, OSError, EOFError, pickle.UnpicklingError):
            return None
        lines = [line for line in str(trace).splitlines() if line.strip()]
        return lines[-1].strip() if lines else None

    def _cleanup_report(self) -> None:
        if self.bootstrap_report:
            try:
                os.unlink(self.bootstrap_report)
            except OSError:
                pass
            self.bootstrap_report = None

    # ---------------------------------------------------------------- steady state (never blocks)
    def publish(self, model: torch.nn.Module, version: int) -> None:
        """Push the parameters of master step ``version`` to every worker that has taken in its last push;
        never waits."""
        t0 = time.perf_counter()
        for rank in list(self.pusher.in_flight):
            proc = self.processes[rank - 1] if self.processes is not None else None
            if proc is not None and not proc.is_alive():
                self.pusher.give_up(rank, f"its process exited (exit code {proc.exitcode})")
                self._lose(rank, self.pusher.lost[rank])
        sent, failed = self.pusher.push(model, version)
        for rank, why in failed:
            self._lose(rank, why)
        self.published_version = version
        now = time.time()
        for rank in sent:
            if self._waiting[rank] is None:
                self._waiting[rank] = (version, now)
        self.sync_seconds += time.perf_counter() - t0

    def _lose(self, rank: int, why: str) -> None:
        if ("dead", rank) in self._warned or ("lost", rank) in self._warned:
            return
        self._warned.add(("lost", rank))
        dead = self.processes is not None and not self.processes[rank - 1].is_alive()
        log.warning("scoring worker %d%s: its parameter push failed (%s); training goes on, the weights of its "
                    "shard keep their last values and age", rank, " exited" if dead else "", why)

    def push_stats(self, train_seconds: float) -> dict:
        return self.pusher.stats(train_seconds) if self.pusher is not None else {}

    @contextlib.contextmanager
    def paused(self):
        """No scoring inside this block (the master runs diagnostics or writes a checkpoint), so that
        staleness and scoring throughput count training time only. Workers we spawned are frozen with
        SIGSTOP, mid-chunk if need be, and continued after (one already stopped by someone else is left
        alone); under torchrun the pause key makes workers start no new chunk (one in flight finishes)."""
        self.store.set(KEY_PAUSE, "1")
        frozen = []
        try:
            for proc in self.processes or []:
                if proc.is_alive() and _process_state(proc.pid) not in ("T", "t", "Z", None):
                    os.kill(proc.pid, signal.SIGSTOP)
                    frozen.append(proc)
            yield
        finally:
            for proc in frozen:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            self.store.set(KEY_PAUSE, "0")

    def collect(self) -> list[ScoreResult]:
        """Every valid result the workers have queued so far (possibly none); malformed or implausible
        messages are logged and dropped."""
        t0 = time.perf_counter()
        results = []
        for _ in range(self.store.queue_len(QUEUE)):
            payload = self.store.queue_pop(QUEUE, block=False)
            try:
                results.append(self.validate(payload))
            except ValueError as exc:
                self.rejected += 1
                if self.rejected <= 20 or self.rejected % 1000 == 0:
                    log.warning("dropped score message %d: %s", self.rejected, exc)
        now = time.time()
        for r in results:
            self.worker_seconds[r.rank] = self.worker_seconds.get(r.rank, 0.0) + r.seconds
            self.scored_examples += r.index.numel()
            waiting = self._waiting.get(r.rank)
            if waiting is not None and r.version >= waiting[0]:
                self._waiting[r.rank] = None
            self._warned.discard(("silent", r.rank))
        self.results += len(results)
        self.sync_seconds += time.perf_counter() - t0
        self._check_health(now)
        return results

    def validate(self, payload: bytes) -> ScoreResult:
        """The result in ``payload``, or ValueError saying what is wrong with it: it must parse, come from a
        rank 1..W, carry parameters the master has published, indices of that rank's shard and finite,
        non-negative norms."""
        try:
            r = ScoreResult.from_bytes(payload)
        except (ValueError, struct.error) as exc:
            raise ValueError(f"unparsable ({len(payload)} bytes): {exc}") from None
        if not 1 <= r.rank <= self.workers:
            raise ValueError(f"rank {r.rank} is not a worker rank (1..{self.workers})")
        if not 0 <= r.version <= self.published_version:
            raise ValueError(f"rank {r.rank}: version {r.version} was never published "
                             f"(latest {self.published_version})")
        if not (math.isfinite(r.seconds) and r.seconds >= 0):
            raise ValueError(f"rank {r.rank}: scoring time {r.seconds}")
        if r.index.numel():
            lo, hi = int(r.index.min()), int(r.index.max())
            if lo < 0 or (self.examples is not None and hi >= self.examples):
                raise ValueError(f"rank {r.rank}: example index out of range [{lo}, {hi}] "
                                 f"(N = {self.examples})")
            if bool(((r.index - (r.rank - 1)) % self.workers != 0).any()):
                raise ValueError(f"rank {r.rank}: indices outside its shard")
            if not bool(torch.isfinite(r.norms).all()) or float(r.norms.min()) < 0:
                raise ValueError(f"rank {r.rank}: non-finite or negative gradient norm (version {r.version}); "
                                 "a diverged model or a forged message")
        return r

    def _check_health(self, now: float) -> None:
        for i, proc in enumerate(self.processes or []):
            rank = i + 1
            if not proc.is_alive() and ("dead", rank) not in self._warned and ("lost", rank) not in self._warned:
                self._warned.add(("dead", rank))
                error = self.worker_error(rank) if proc.exitcode and proc.exitcode > 0 else None
                log.warning("scoring worker %d exited (exit code %s%s); training goes on, the weights of its "
                            "shard keep their last values and age", rank, proc.exitcode, f": {error}" if error else "")
        for rank, waiting in self._waiting.items():
            if (waiting is not None and now - waiting[1] > self.worker_timeout
                    and not {("dead", rank), ("lost", rank), ("silent", rank)} & self._warned):
                self._warned.add(("silent", rank))
                log.warning("scoring worker %d has sent no norms for the parameters pushed to it %.0f s ago; "
                            "training goes on, the weights of its shard age", rank, now - waiting[1])

    def alive(self) -> list[int]:
        """Workers that still get parameters (and, when spawned here, whose process runs)."""
        lost = self.pusher.lost if self.pusher is not None else {}
        return [r for r in range(1, self.workers + 1) if r not in lost
                and (self.processes is None or self.processes[r - 1].is_alive())]

    def close(self, timeout: float = 5.0) -> None:
        """Tell the workers to stop and close their parameter channels, give them ``timeout`` seconds, then
        terminate and, if that does not do it (a stopped or hung worker), SIGKILL them: closing never blocks
        on a worker."""
        if self._closed:
            return
        self._closed = True
        self._cleanup_report()
        try:
            self.store.set(KEY_STOP, "1")
        except Exception as exc:  # noqa: BLE001  (failing to signal must not mask the error being raised)
            log.debug("could not signal the workers to stop: %s", exc)
        procs = self.processes or []
        deadline = time.monotonic() + timeout
        while self.pusher is not None and any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            self.pusher.release_idle()  # ends those workers' standing receives, so that they can exit
            time.sleep(0.02)
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 1.0
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():  # SIGTERM stays pending on a stopped process; SIGKILL does not
                log.warning("scoring worker (pid %d) did not stop; killing it", proc.pid)
                proc.kill()
                proc.join(5.0)
        if self.pusher is not None:
            for rank in list(self.pusher.in_flight):  # pushes to workers that are gone now: nothing to wait for
                if procs and not procs[rank - 1].is_alive():
                    self.pusher.give_up(rank, "stopped at exit")
            self.pusher.close()
        for path in self.error_files:  # written only by a worker that raised
            with contextlib.suppress(OSError):
                os.unlink(path)
        if dist.is_initialized():
            dist.destroy_process_group()


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T, Z, ...); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the master dies, even while it is stopped (paused)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------- the worker process
def worker_entry(local_index: int, device: str, job: bytes) -> None:
    """Entry point of a spawned worker (ranks 1..W)."""
    _die_with_parent()
    if os.getppid() == 1:  # the master died before the line above took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the master decides
    if device.startswith("cpu"):
        os.nice(WORKER_NICE)  # before the imports: they alone take seconds of CPU
    os.environ["RANK"] = str(local_index + 1)
    try:
        job = pickle.loads(job)
    except (AttributeError, ImportError) as exc:
        raise RuntimeError(f"scoring worker {local_index + 1} cannot rebuild the model, data or loss it was sent "
                           f"({exc}): classes and functions defined in an interactive interpreter or a notebook do not "
                           "reach spawned processes; define them in a module (a .py file) and import them from there") \
            from exc
    run_worker(job)


def run_worker(job) -> None:
    """Score this rank's shard of ``job`` (an ``issgd.job.WorkerJob``), chunk by chunk, with the freshest
    parameters, until told to stop; start no chunk while the master has paused the workers."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device(job.device, rank)
    if device.type == "cpu":
        torch.set_num_threads(job.worker_threads)
        os.nice(max(0, WORKER_NICE - os.nice(0)))  # torchrun-launched workers were not niced yet
    store = connect(rank, world_size, max(job.startup_timeout, 60.0))
    receiver = None
    try:
        data, model, signal_fn = job.build(device)
        cursor = ChunkCursor(shard_of(rank, world_size - 1, len(data)), job.chunk_size)
        delay = dict(job.slow_workers).get(rank, 0.0)
        layout = ParameterLayout(model)
        expected = store.get(KEY_LAYOUT).decode()
        if layout.describe() != expected:
            raise StartupError(f"scoring worker {rank} built a model of {layout.describe()}, the master's has "
                               f"{expected}: every rank must run the same configuration")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if launched_by_torchrun() else world_size
        store.set(f"{KEY_READY}{rank}", "nccl" if nccl_capable(torch.device(job.device), local) else "gloo")
        backend = store.get(KEY_TRANSPORT).decode()  # the master's choice, once every worker is ready
        receiver = ParameterReceiver(store, rank, layout, backend, device, loopback=not launched_by_torchrun(),
                                     timeout=timedelta(seconds=max(job.startup_timeout, 60.0)))
        version, scored = None, 0
        while not store.check([KEY_STOP]):
            if store.check([KEY_PAUSE]) and store.get(KEY_PAUSE) == b"1":
                time.sleep(POLL_SECONDS)
                continue
            if store.check([f"{KEY_GIVEN_UP}{rank}"]):
                raise TransportError(f"the master gave up this worker's parameter channel: "
                                     f"{store.get(f'{KEY_GIVEN_UP}{rank}').decode()}")
            newer = receiver.take(model)
            if newer is not None:
                version, scored = newer, 0
            elif version is None or scored >= len(cursor.shard):  # shard done with these parameters: wait
                time.sleep(POLL_SECONDS)
                continue
            index = cursor.next()
            t0 = time.perf_counter()
            norms = signal_fn(*data.fetch(index), job.loss_fn)
            if delay:
                time.sleep(delay)
            store.queue_push(QUEUE, ScoreResult(rank, version, index, norms, time.perf_counter() - t0).to_bytes())
            scored += index.numel()
    except (dist.DistError, ConnectionError) as exc:
        # The master has gone (it owns the store) or given up this worker's channel: nothing left to score for.
        log.info("scoring worker %d stops: %s", rank, exc)
    finally:
        if receiver is not None:
            receiver.close()
