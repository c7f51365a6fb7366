"""The distributed scoring driver, on torch.distributed (docs/design.md, "Distributed scoring").

Rank 0 is the master (it trains); ranks 1..W are scoring workers, each owning the shard of
examples ``shard_of(rank)``. Start-up is one rendezvous (``env://``: MASTER_ADDR/MASTER_PORT/RANK/
WORLD_SIZE, as set by ``torchrun`` or by ``ScoringPool.spawn``) and one process-group barrier
(gloo on CPU, NCCL when every rank has its own GPU). After that nothing is collective, so nobody
ever waits for anybody:

* the master ``set``s its parameters (with their version, the master step) in the rendezvous
  key-value store every K steps -- the role Redis played for the paper's authors;
* a worker reads the version key before each chunk, fetches the parameters when they changed,
  scores the chunk with ``GradNormScorer`` and ``queue_push``es (indices, norms, version); once
  its whole shard is scored with the current parameters it sleeps until newer ones appear;
* the master drains the queue without blocking (``queue_len`` then ``queue_pop``) when it refreshes.

The store lives in the master's process (or in torchrun's agent), so a worker that dies or hangs
costs the master nothing: its shard's weights age, and the master logs a warning. (Under torchrun,
the agent itself tears the job down when a worker process exits with an error; ``--workers W``,
which spawns the workers itself, keeps training.)
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from issgd.config import TrainConfig
from issgd.scoring import XENT, ChunkCursor, ScoreResult, shard_of

log = logging.getLogger("issgd")

KEY_PARAMS = "issgd/params"
KEY_VERSION = "issgd/version"
KEY_STOP = "issgd/stop"
QUEUE = "issgd/scores"
# A worker with nothing to do re-reads the version key this often: 50 small requests/s per idle
# worker, negligible for the store thread in the master's process.
POLL_SECONDS = 0.02
# Workers run at lower CPU priority so that, when cores are short, scoring yields to training.
WORKER_NICE = 10


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_group_backend(device: torch.device, world_size: int) -> str:
    """NCCL needs one GPU per rank; with fewer GPUs (e.g. several workers on one GPU) use gloo,
    which only carries the start-up barrier anyway."""
    if device.type == "cuda" and dist.is_nccl_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def rank_device(device: str, rank: int) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
    return dev


def connect(rank: int, world_size: int, device: torch.device, timeout_s: float = 300.0) -> dist.Store:
    """Rendezvous through env:// and start the process group; returns the shared key-value store."""
    store, rank, world_size = next(dist.rendezvous("env://", rank, world_size))
    store.set_timeout(timedelta(seconds=timeout_s))
    backend = process_group_backend(device, world_size)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world_size, **kwargs)
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScoringPool:
    """The master's side of the driver: publish parameters, collect norms, watch worker health."""

    def __init__(self, store: dist.Store, workers: int, *, processes=None, worker_timeout: float = 60.0):
        self.store = store
        self.workers = workers
        self.processes = processes  # multiprocessing.Process list when we spawned them ourselves
        self.worker_timeout = worker_timeout
        self.published_version = -1
        self.sync_seconds = 0.0  # master time spent publishing and collecting
        self.results = 0
        self.scored_examples = 0
        self.worker_seconds = {r: 0.0 for r in range(1, workers + 1)}
        self._waiting_since: dict[int, float | None] = {r: None for r in range(1, workers + 1)}
        self._warned: set[tuple[str, int]] = set()
        self._closed = False

    # ---------------------------------------------------------------- start-up
    @classmethod
    def spawn(cls, config, workers: int, device: torch.device, **kwargs) -> ScoringPool:
        """Start ``workers`` scoring processes on this machine and become rank 0."""
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(workers + 1),
                          RANK="0")
        ctx = mp.start_processes(worker_entry, args=(asdict(config),), nprocs=workers, join=False,
                                 start_method="spawn")
        store = connect(0, workers + 1, device)
        return cls(store, workers, processes=ctx.processes, **kwargs)

    @classmethod
    def from_torchrun(cls, device: torch.device, **kwargs) -> ScoringPool:
        world_size = int(os.environ["WORLD_SIZE"])
        return cls(connect(0, world_size, device), world_size - 1, **kwargs)

    def start(self, model: torch.nn.Module, version: int) -> None:
        """Publish the first parameters, then the one collective: every worker is up and has its data."""
        self.publish(model, version)
        dist.barrier()

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

    def collect(self) -> list[ScoreResult]:
        """Every result the workers have queued so far (possibly none)."""
        t0 = time.perf_counter()
        results = []
        for _ in range(self.store.queue_len(QUEUE)):
            results.append(ScoreResult.from_bytes(self.store.queue_pop(QUEUE, block=False)))
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

    def _check_health(self, now: float) -> None:
        for i, proc in enumerate(self.processes or []):
            rank = i + 1
            if not proc.is_alive() and ("dead", rank) not in self._warned:
                self._warned.add(("dead", rank))
                log.warning("scoring worker %d exited (exit code %s); training goes on, the weights of its "
                            "shard keep their last values and age", rank, proc.exitcode)
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

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.store.set(KEY_STOP, "1")
        except Exception as exc:  # noqa: BLE001  (failing to signal must not mask the error being raised)
            log.debug("could not signal the workers to stop: %s", exc)
        deadline = time.time() + timeout
        for proc in self.processes or []:
            proc.join(max(0.0, deadline - time.time()))
            if proc.is_alive():
                proc.terminate()
                proc.join(1.0)
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- the worker process
def worker_entry(local_index: int, config: dict) -> None:
    """Entry point of a spawned worker (ranks 1..W)."""
    if config["device"].startswith("cpu"):
        os.nice(WORKER_NICE)  # before the imports: they alone take seconds of CPU
    os.environ["RANK"] = str(local_index + 1)
    run_worker(TrainConfig(**config))


def run_worker(config: TrainConfig) -> None:
    """Score this rank's shard, chunk by chunk, with the freshest parameters, until told to stop."""
    from issgd.job import build_job  # imported here: a spawned worker lowers its priority first

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device(config.device, rank)
    if device.type == "cpu":
        torch.set_num_threads(config.worker_threads)
        os.nice(max(0, WORKER_NICE - os.nice(0)))  # torchrun-launched workers were not niced yet
    store = connect(rank, world_size, device)
    try:
        job = build_job(config, device)
        data, model, scorer = job.data, job.model, job.scorer
        cursor = ChunkCursor(shard_of(rank, world_size - 1, len(data.x_train)), config.chunk_size)
        delay = dict(config.slow_workers).get(rank, 0.0)
        dist.barrier()
        version, scored = None, 0
        while not store.check([KEY_STOP]):
            if int(store.get(KEY_VERSION)) != version:
                version, scored = unpack_parameters_into(model, store.get(KEY_PARAMS)), 0
            elif scored >= len(cursor.shard):  # shard done with these parameters: wait for newer ones
                time.sleep(POLL_SECONDS)
                continue
            index = cursor.next()
            t0 = time.perf_counter()
            dev_index = index.to(device)
            norms = scorer.norms(data.x_train[dev_index], data.y_train[dev_index], XENT)
            if delay:
                time.sleep(delay)
            store.queue_push(QUEUE, ScoreResult(rank, version, index, norms, time.perf_counter() - t0).to_bytes())
            scored += index.numel()
    except (dist.DistError, ConnectionError) as exc:
        # The master has gone (it owns the store): nothing left to score for.
        log.info("scoring worker %d stops: %s", rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
