"""A torch.compile cache shared through Ray storage: one compile per cluster, not one per process.

Every restart after a failure, every rerun and every Tune trial would otherwise compile the same graphs
again. torch.compiler's portable cache artifacts (the FX graph and AOTAutograd caches; on GPU with the
Triton kernels bundled in) are saved once compilation has happened, to
<storage_path>/compile-cache/<key>.bin, and loaded into the process's own inductor cache before the
next process compiles. torch keys each artifact by the graph, its inputs and the compiler's own
version, so a changed model or graph is a cache miss, never a wrong kernel. The file's key keeps apart
what must never share a file (torch, Python, the GPU or CPU, and the GPU's index, which torch's keys
hold) and what decides the set of graphs (model shape, compile options, worker count): a file holds the
artifacts of the last process that compiled something new under its key, which are what every run with
that key needs. On CPU a hit still compiles the C++ kernels' source (torch keeps no binary of them); on
GPU it skips Triton's compile too.

Storage is a local path or a URI (s3://, gs://, any pyarrow.fs). Failures to read or write are one-line
warnings: a cache can only ever cost a compile, never a run.

Inductor's compile-worker processes (CompileWorkers) are started early and stopped once the graphs are
compiled; `Compiles.after_step` is what the loop's first steps do for compiling (cache save, workers' stop).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from raygpt.config.schema import GRAPH_KEYS
from raygpt.errors import one_line
from raygpt.storage.uri import join_uri, read_small_file, write_small_file

CACHE_FOLDER = "compile-cache"


def environment_key(device: torch.device) -> str:
    """torch, Python and the device: artifacts made under one never serve another. On a GPU the
    device's index too: torch keys each graph by its inputs' device, so the graphs of a worker on
    cuda:1 are not those of one on cuda:0, and each index gets a file of its own."""
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        where = f"cuda{torch.version.cuda}-{torch.cuda.get_device_name(device)}-sm{major}{minor}-gpu{index}"
    else:
        where = f"{device.type}-{platform.machine()}"
    return f"torch{torch.__version__}-{python}-{where}"


def graph_settings(cfg, model_args: dict, world_size: int) -> dict:
    """What decides the set of graphs a run compiles: the model's shape, compile options, worker count
    (DDP splits the graph at its buckets; eval's batch grouping depends on each rank's share)."""
    return {**model_args, **{key: getattr(cfg, key) for key in GRAPH_KEYS}, "world_size": world_size}


def cache_writer(rank: int, local_rank: int, device: torch.device) -> bool:
    """Whether this rank saves the run's compile cache: one rank per file. On CPU every rank compiles
    the same graphs (rank 0 writes); on GPUs each device index has its own file, written by the first
    node's rank on that index (Ray numbers the first node's workers 0..n-1, local ranks alike)."""
    return rank == (local_rank if device.type == "cuda" else 0)


def cache_key(environment: str, settings: dict) -> str:
    """A file name: the environment spelled out (readable in a listing), the settings as a short hash."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{environment}-{digest}")  # '+' and spaces upset some S3 clients


def cache_location(storage_root: str, key: str) -> str:
    return join_uri(storage_root, CACHE_FOLDER, f"{key}.bin")


@contextmanager
def _quiet_torch_cache_log():
    """torch logs an unreadable artifact file as a warning with a traceback; ours is one line."""
    logger = logging.getLogger("torch.compiler._cache")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reason(error: Exception) -> str:
    return one_line(str(error)) or type(error).__name__


def _artifact_keys(info) -> set[tuple[str, str]]:
    return {(kind, key) for kind, keys in info.artifacts.items() for key in keys}


class CompileCache:
    """load() before the model's first compiled call, save() once its graphs have compiled (after the
    first training step and the first eval); summary() says what happened, in one line.

    Every rank loads; only a writer (cache_writer: one rank per file) saves, and only when this process
    compiled an artifact the file lacks, so warm runs never rewrite it. Two runs saving at once is safe:
    each write is whole, and the last one wins."""

    def __init__(self, storage_root: str, device: torch.device, settings: dict, writer: bool = True,
                 warn: Callable[[str], None] = print, environment: str | None = None):  # fmt: skip
        self.key = cache_key(environment or environment_key(device), settings)
        self.location = cache_location(storage_root, self.key)
        self.writer, self.warn = writer, warn
        self.known: set[tuple[str, str]] = set()  # the artifacts the file holds
        self.loaded_bytes = self.saved_bytes = 0
        self.load_seconds = self.save_seconds = 0.0
        self.graphs_before = graph_counts()  # a process may train more than once (Tune reuses trial actors)

    @property
    def hit(self) -> bool:
        return self.loaded_bytes > 0

    def load(self) -> bool:
        """Put the stored artifacts into this process's inductor cache; True on a hit."""
        start = time.time()
        try:
            data = read_small_file(self.location, limit=None)  # as large as the compiled graphs make it
            if data is not None:
                with _quiet_torch_cache_log():
                    info = torch.compiler.load_cache_artifacts(data)
                if info is None:
                    raise ValueError(f"{len(data):,} bytes that torch cannot read (corrupt or truncated)")
                self.known, self.loaded_bytes = _artifact_keys(info), len(data)
        except Exception as e:  # any failure here costs a compile, never the run
            self.warn(f"warning: compile cache {self.location} not used: {_reason(e)}; compiling from scratch")
        self.load_seconds = time.time() - start
        return self.hit

    def save(self) -> bool:
        """Store what this process compiled or reused, if any of it is new to the file; True if written."""
        if not self.writer:
            return False
        start = time.time()
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return False
        data, info = result
        if _artifact_keys(info) <= self.known:
            return False  # every artifact came from the file: it needs no rewrite
        try:
            write_small_file(self.location, data)
        except Exception as e:
            self.warn(f"warning: compile cache not saved to {self.location}: {_reason(e)}")
            return False
        self.known, self.saved_bytes = _artifact_keys(info), len(data)
        self.save_seconds += time.time() - start
        return True

    def summary(self) -> str:
        """One line: hit or miss, the graphs taken from a cache against those compiled here, what was saved."""
        loaded = f"hit, {self.loaded_bytes / 1e6:.1f} MB in {self.load_seconds:.2f} s" if self.hit else "miss"
        cached, compiled = (now - before for now, before in zip(graph_counts(), self.graphs_before))
        graphs = (
            f"{cached} cached, {compiled} compiled"
            if cached or compiled
            else "none new (compiled earlier in this process)"
        )
        saved = f"; saved {self.saved_bytes / 1e6:.1f} MB in {self.save_seconds:.2f} s" if self.saved_bytes else ""
        return f"compile cache {self.key}: {loaded}; graphs: {graphs}{saved}"


def graph_counts() -> tuple[int, int]:
    """Inductor's graphs taken from its cache and compiled, so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


class CompileWorkers:
    """Inductor's pool of compile-worker processes, started early and stopped as soon as it is done.

    start(): each worker imports torch and Triton, which takes seconds; started before the model is
    built, they boot while the optimizer, the data and the first eval are set up, and the compile finds
    them ready (Inductor compiles kernels in the main process, one at a time, while its pool is not
    ready). stop_in_background(): once the graphs are compiled, shut the pool down in a thread, instead
    of at interpreter exit after the run's last line. ready_for_compile(): a later compile (a recompile,
    an eval graph first used after a resume) starts a new pool; it must not pick up the one being shut
    down. Private torch APIs: on any failure torch manages its pool itself, as without this class."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.stopping: threading.Thread | None = None

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            from torch._inductor.async_compile import maybe_warm_pool

            maybe_warm_pool()
        except Exception:  # noqa: BLE001 - an optimization only
            pass

    def stop_in_background(self) -> None:
        if not self.enabled or self.stopping is not None:
            return
        try:
            from torch._inductor.async_compile import shutdown_compile_workers
        except Exception:  # noqa: BLE001
            return
        # Not a daemon: exit waits for a clean shutdown rather than killing the thread halfway through it.
        self.stopping = threading.Thread(target=shutdown_compile_workers, name="stop-compile-workers")
        self.stopping.start()

    def ready_for_compile(self) -> None:
        if self.stopping is not None:
            self.stopping.join()


@dataclass
class Compiles:
    """The run's compiles as the loop sees them, after its first steps (the loop's hook point): share the
    newly compiled graphs after the first, stop the compile workers after the third, when forward and
    backward are compiled."""

    cache: CompileCache | None  # None: compile or the cache is off
    workers: CompileWorkers
    say: Callable

    def after_step(self, local_iter_num: int, now: float, last: bool) -> None:
        if local_iter_num == 1 and self.cache is not None:
            self.cache.save()  # the training step (and a fresh run's first eval) are compiled now
            self.say(self.cache.summary(), flush=True)
        if local_iter_num == 3:
            self.workers.stop_in_background()

    def after_eval(self, local_iter_num: int) -> None:
        if self.cache is not None and local_iter_num > 0:
            self.cache.save()  # a resumed run compiles eval here; nothing is written if nothing is new
