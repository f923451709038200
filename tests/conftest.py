"""Shared test fixtures: offline tiktoken, the tiny Shakespeare corpus, one Ray local cluster per session.

Two tiers: `pytest -m "not ray"` runs in about 4 minutes on 2 cores and starts no Ray process (Ray
Train's local mode trains in the test's own process); `pytest -m ray` is the rest. A test that uses the
`ray_local` cluster is marked `ray` here; a module that starts Ray some other way says
`pytestmark = pytest.mark.ray`. A test left unmarked that starts Ray anyway fails (`fast_tier_starts_no_ray`).
"""

import hashlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # what the tests read, shipped with them (tests/data/README.md)
SHAKESPEARE = TEST_DATA / "tinyshakespeare.txt"
GPT2_BPE = TEST_DATA / "gpt2-bpe"
# Where tiktoken's gpt2 encoding downloads its two files from (tiktoken_ext.openai_public.gpt2).
GPT2_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def _offline_tiktoken(cache_root: Path) -> None:
    """Tests must not download: give tiktoken a cache that already holds GPT-2's BPE files. tiktoken
    (tiktoken.load.read_file_cached) looks for a file in TIKTOKEN_CACHE_DIR under the sha1 of its URL, and
    uses it if its sha256 is the one it expects. A TIKTOKEN_CACHE_DIR already set is used as it is."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return
    cache = cache_root / "tiktoken-cache"
    cache.mkdir(parents=True, exist_ok=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(GPT2_BPE / name, cache / hashlib.sha1((GPT2_BPE_URL + name).encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


def pytest_configure(config):
    import tempfile

    _offline_tiktoken(Path(tempfile.mkdtemp(prefix="raygpt-tests-")))
    # Keep Ray quiet and local in tests.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # A shell that starts pytest in the background (`pytest &`, or a script run with `&`) makes it ignore
    # SIGINT, and its children inherit that: the tests that press Ctrl-C on a child would then see it
    # ignored. Deliver it as a terminal would, however pytest was started.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


RAY_DAEMONS = ("raylet", "gcs_server")


def ray_daemons_below_this_process() -> set[int]:
    """Pids of Ray's raylet and GCS among this process's descendants (an embedded Ray, or one started by
    a subprocess that is still running)."""
    import psutil

    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name() in RAY_DAEMONS:
                pids.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def ray_is_initialized() -> bool:
    ray = sys.modules.get("ray")  # a test that never imported Ray cannot have started it in-process
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def fast_tier_starts_no_ray(request):
    """Keep the fast tier honest: a test without the `ray` marker must not start Ray in this process,
    nor leave Ray daemons running under it."""
    if request.node.get_closest_marker("ray"):
        yield
        return
    initialized, daemons = ray_is_initialized(), ray_daemons_below_this_process()
    yield
    started = ray_daemons_below_this_process() - daemons
    if (ray_is_initialized() and not initialized) or started:
        pytest.fail(f"{request.node.nodeid} started Ray (daemon pids {sorted(started)}): mark it pytest.mark.ray")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return SHAKESPEARE


@pytest.fixture(scope="session")
def ray_local():
    """One Ray local cluster for the whole session; starting Ray costs seconds, so tests share it."""
    import ray

    # 2-core CI machines: advertise 4 logical CPUs so two 1-CPU workers and Ray's own actors fit.
    from raygpt.driver.ray_cluster import quiet_ray

    quiet_ray()
    with pytest.MonkeyPatch.context() as patch:
        # As the launcher has it for a Ray it starts itself: no drained nodes to watch for, so no watcher
        # actor (a process each run) competing with the run for the CPUs. Launchers joining the
        # loopback clusters of tests/multinode.py decide for themselves (driver_env).
        patch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # No dashboard: nothing here reads it, and its processes take seconds of CPU to start.
        context = ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        yield context.address_info["address"]
        ray.shutdown()


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_path) -> Path:
    """The real shakespeare_char dataset, prepared once; returns the data_dir holding it."""
    from raygpt.prep.shakespeare import prepare_shakespeare_char

    data_dir = tmp_path_factory.mktemp("data")
    prepare_shakespeare_char(data_dir, input_path=shakespeare_path)
    return data_dir


# A few seconds of real training through the CLI in local mode: what the launcher tests run.
TINY_LOCAL_RUN = [
    "--dataset=shakespeare_char",
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=16",
    "--block_size=16",
    "--batch_size=4",
    "--gradient_accumulation_steps=1",
    "--max_iters=4",
    "--eval_interval=2",
    "--eval_iters=2",
    "--log_interval=2",
    "--device=cpu",
    "--compile=False",
    "--warmup_iters=1",
    "--lr_decay_iters=10",
    "--local_mode=True",
]


# A tiny GPT on shakespeare_char for a few seconds of CPU training (TrainConfig keys).
TINY_RUN = dict(
    dataset="shakespeare_char",
    n_layer=2,
    n_head=2,
    n_embd=32,
    block_size=32,
    batch_size=8,
    gradient_accumulation_steps=2,
    dropout=0.0,
    bias=False,
    learning_rate=1e-2,
    min_lr=1e-3,
    warmup_iters=5,
    lr_decay_iters=40,
    max_iters=20,
    eval_interval=10,
    eval_iters=4,
    log_interval=5,
    device="cpu",
    dtype="float32",
    compile=False,
    always_save_checkpoint=True,
    seed=7,
)


class S3Server:
    """A moto S3 server on loopback: its endpoint, and buckets made on it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.buckets = 0

    def create_bucket(self, name: str | None = None) -> str:
        """Make a bucket (a fresh name unless one is given) and return its URI, s3://NAME."""
        import pyarrow.fs

        self.buckets += 1
        name = name or f"bucket-{self.buckets}"
        pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint, allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """One S3-compatible server (moto, in a thread of this process) on 127.0.0.1 for the session. The AWS
    variables point at it for the whole session, so subprocesses and Ray workers started later reach it."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    werkzeug_log = logging.getLogger("werkzeug")  # one line per request otherwise
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
            patch.delenv(name, raising=False)  # the developer's own settings would win over these
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no probe of a cloud metadata service
        try:
            yield S3Server(endpoint)
        finally:
            server.stop()
            werkzeug_log.setLevel(level)


# A head that trains nothing (it holds the drivers, as on a cloud cluster) and three one-CPU nodes: two
# one-CPU workers land on two different nodes, neither the driver's, and the third node is spare.
LOOPBACK_NODES = {"head": 0, "node-1": 1, "node-2": 1, "node-3": 1}


@pytest.fixture(scope="session")
def ray_nodes(s3_server, tmp_path_factory):
    """A Ray cluster of four nodes on this machine (tests/multinode.py), each with its own root and data
    cache, for the session; nothing in this process joins it. Which machine reads and writes which file
    under the session's tmp_path folders is logged (cluster.cross_node_reads). Started after the S3
    server, so its workers reach it through the AWS variables, as a cloud node would with its credentials."""
    from multinode import start_cluster

    cluster = start_cluster(LOOPBACK_NODES, watch=[tmp_path_factory.getbasetemp()])
    yield cluster
    cluster.stop()
