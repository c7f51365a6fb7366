"""The distributed scoring driver, on torch.distributed (docs/design.md, "Distributed scoring").

Rank 0 is the master (it trains); ranks 1..W are scoring workers, each owning the shard of
examples ``shard_of(rank)``. Start-up: every worker connects to the key-value store (``ScoringPool.spawn``'s
own, listening on 127.0.0.1 only; under ``torchrun``, torchrun's, through the ``env://`` rendezvous), builds
its data and model and sets its ready key; the master waits at most ``startup_timeout`` seconds for all of
them and raises ``StartupError`` naming the worker that exited or never arrived. After that nothing waits
for anybody:

* the master ``set``s its parameters (with their version, the master step) in the rendezvous
  key-value store every K steps -- the role Redis played for the paper's authors;
* a worker reads the version key before each chunk, fetches the parameters when they changed,
  scores the chunk with ``GradNormScorer`` and ``queue_push``es (indices, norms, version); once
  its whole shard is scored with the current parameters it sleeps until newer ones appear;
* the master drains the queue without blocking (``queue_len`` then ``queue_pop``) when it refreshes,
  validates every message (rank, version, index range and shard, finite non-negative norms) and logs and
  drops a bad one;
* while the master runs diagnostics or writes a checkpoint, spawned workers are frozen (SIGSTOP/SIGCONT)
  and torchrun's see the pause key and start no new chunk, so staleness and scoring throughput count
  training time only.

The store lives in the master's process (or in torchrun's agent), so a worker that dies or hangs
costs the master nothing: its shard's weights age, and the master logs a warning. (Under torchrun,
the agent itself tears the job down when a worker process exits with an error; ``--workers W``,
which spawns the workers itself, keeps training.)
"""
from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from issgd.scoring import ChunkCursor, ScoreResult, shard_of

log = logging.getLogger("issgd")

KEY_PARAMS = "issgd/params"
KEY_VERSION = "issgd/version"
KEY_STOP = "issgd/stop"
KEY_PAUSE = "issgd/pause"  # "1" while the master runs diagnostics or writes a checkpoint
KEY_READY = "issgd/ready/"  # + rank: set by a worker once it has its data and model
QUEUE = "issgd/scores"
# A worker with nothing to do re-reads the version key this often: 50 small requests/s per idle
# worker, negligible for the store thread in the master's process.
POLL_SECONDS = 0.02
# Workers run at lower CPU priority so that, when cores are short, scoring yields to training.
WORKER_NICE = 10


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


def pack_parameters(model: torch.nn.Module, version: int) -> bytes:
    """The model's state (parameters and buffers) as raw bytes after an 8-byte version. Both sides
    build the same model, so shapes and dtypes need not travel (and no unpickling is needed)."""
    parts = [struct.pack("<q", version)]
    parts += [t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b""
              for t in model.state_dict().values()]
    return b"".join(parts)


def unpack_parameters_into(model: torch.nn.Module, payload: bytes) -> int:
    """Inverse of ``pack_parameters``: copies the state into ``model``; returns the version."""
    (version,) = struct.unpack_from("<q", payload)
    state = model.state_dict()
    expected = 8 + sum(t.numel() * t.element_size() for t in state.values())
    if len(payload) != expected:
        raise ValueError(f"parameter payload of {len(payload)} bytes, the model needs {expected}: "
                         "master and worker built different models")
    offset = 8
    with torch.no_grad():
        for t in state.values():
            size = t.numel() * t.element_size()
            raw = torch.frombuffer(bytearray(payload[offset:offset + size]), dtype=torch.uint8) if size else None
            if raw is not None:
                t.copy_(raw.view(t.dtype).view(t.shape))
            offset += size
    return version


class ScoringPool:
    """The master's side of the driver: publish parameters, collect norms, watch worker health."""

    def __init__(self, store: dist.Store, workers: int, *, processes=None, worker_timeout: float = 60.0,
                 startup_timeout: float = 120.0, examples: int | None = None, bootstrap_report: str | None = None):
        self.store = store
        self.workers = workers
        self.processes = processes  # multiprocessing.Process list when we spawned them ourselves
        self.worker_timeout = worker_timeout
        self.startup_timeout = startup_timeout
        self.examples = examples  # N: results are checked against it
        self.bootstrap_report = bootstrap_report
        self.port: int | None = None
        self.published_version = -1
        self.sync_seconds = 0.0  # master time spent publishing and collecting
        self.results = 0
        self.rejected = 0  # messages dropped by validation
        self.scored_examples = 0
        self.worker_seconds = {r: 0.0 for r in range(1, workers + 1)}
        self._waiting_since: dict[int, float | None] = {r: None for r in range(1, workers + 1)}
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
                   bootstrap_report=report, **kwargs)
        pool.port = port
        pool.error_files = ctx.error_files  # where a worker's exception goes (torch's spawn wrapper writes it)
        return pool

    @classmethod
    def from_torchrun(cls, device: torch.device, *, startup_timeout: float = 120.0, **kwargs) -> ScoringPool:
        world_size = int(os.environ["WORLD_SIZE"])
        return cls(connect(0, world_size, startup_timeout), world_size - 1, startup_timeout=startup_timeout,
                   **kwargs)

    def start(self, model: torch.nn.Module, version: int) -> None:
        """Publish the first parameters, then wait (at most ``startup_timeout`` seconds) until every worker
        has reported ready; a worker that exits or never reports raises StartupError."""
        self.publish(model, version)
        deadline = time.monotonic() + self.startup_timeout
        waiting = set(range(1, self.workers + 1))
        while True:
            waiting = {r for r in waiting if not self.store.check([f"{KEY_READY}{r}"])}
            if not waiting:
                break
            for i, proc in enumerate(self.processes or []):
                if not proc.is_alive():
                    raise StartupError(self._startup_death(i + 1, proc.exitcode))
            if time.monotonic() > deadline:
                ranks = ", ".join(map(str, sorted(waiting)))
                raise StartupError(f"scoring worker(s) {ranks} did not report ready within {self.startup_timeout:g} s "
                                   "(--startup-timeout); a worker that is stopped, hung or still loading its data "
                                   "never arrived")
            time.sleep(0.05)
        self._cleanup_report()

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
        t0 = time.perf_counter()
        self.store.set(KEY_PARAMS, pack_parameters(model, version))
        self.store.set(KEY_VERSION, str(version))  # after the parameters: a reader never sees a version early
        self.published_version = version
        now = time.time()
        for rank, since in self._waiting_since.items():
            if since is None:
                self._waiting_since[rank] = now
        self.sync_seconds += time.perf_counter() - t0

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
            if r.version == self.published_version:
                self._waiting_since[r.rank] = None
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
            if not proc.is_alive() and ("dead", rank) not in self._warned:
                self._warned.add(("dead", rank))
                error = self.worker_error(rank) if proc.exitcode and proc.exitcode > 0 else None
                log.warning("scoring worker %d exited (exit code %s%s); training goes on, the weights of its "
                            "shard keep their last values and age", rank, proc.exitcode, f": {error}" if error else "")
        for rank, since in self._waiting_since.items():
            if (since is not None and now - since > self.worker_timeout and ("dead", rank) not in self._warned
                    and ("silent", rank) not in self._warned):
                self._warned.add(("silent", rank))
                log.warning("scoring worker %d has sent no norms for the parameters published %.0f s ago; "
                            "training goes on, the weights of its shard age", rank, now - since)

    def alive(self) -> list[int]:
        if self.processes is None:
            return list(range(1, self.workers + 1))
        return [i + 1 for i, p in enumerate(self.processes) if p.is_alive()]

    def close(self, timeout: float = 5.0) -> None:
        """Tell the workers to stop, give them ``timeout`` seconds, then terminate and, if that does not
        do it (a stopped or hung worker), SIGKILL them: closing never blocks on a worker."""
        if self._closed:
            return
        self._closed = True
        self._cleanup_report()
        try:
            self.store.set(KEY_STOP, "1")
        except Exception as exc:  # noqa: BLE001  (failing to signal must not mask the error being raised)
            log.debug("could not signal the workers to stop: %s", exc)
        deadline = time.monotonic() + timeout
        procs = self.processes or []
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
    try:
        data, model, signal_fn = job.build(device)
        cursor = ChunkCursor(shard_of(rank, world_size - 1, len(data)), job.chunk_size)
        delay = dict(job.slow_workers).get(rank, 0.0)
        store.set(f"{KEY_READY}{rank}", "1")
        version, scored = None, 0
        while not store.check([KEY_STOP]):
            if store.check([KEY_PAUSE]) and store.get(KEY_PAUSE) == b"1":
                time.sleep(POLL_SECONDS)
                continue
            if int(store.get(KEY_VERSION)) != version:
                version, scored = unpack_parameters_into(model, store.get(KEY_PARAMS)), 0
            elif scored >= len(cursor.shard):  # shard done with these parameters: wait for newer ones
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
        # The master has gone (it owns the store): nothing left to score for.
        log.info("scoring worker %d stops: %s", rank, exc)
