"""The compile cache shared through storage: one process compiles and saves, a fresh one loads and hits.

Each compiling process is a real subprocess with its own empty TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR, so the only way the second can hit is through the cache file the first saved.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from raygpt.storage.uri import read_small_file, write_small_file
from raygpt.worker.compile import CompileCache, cache_key, cache_writer, environment_key

ENVIRONMENT = "test-environment"  # stands for environment_key(): the subprocesses share it
SETTINGS = {"n_layer": 1, "batch_size": 2}
# Each process compiles the kernels' C++ even on a hit; scalar kernels compile in half the time of
# vectorized ones, and compiling in-process skips starting a pool of compile workers.
FAST_CPU_COMPILE = {"TORCHINDUCTOR_VEC_ISA_OK": "0", "TORCHINDUCTOR_COMPILE_THREADS": "1"}

# A tiny GPT's forward and backward through torch.compile, between CompileCache.load() and save().
COMPILE_ONE_STEP = textwrap.dedent("""
    import json, sys, time
    import torch
    from torch._dynamo.utils import counters
    from raygpt.worker.compile import CompileCache
    from raygpt.core.model import GPT, GPTConfig

    root, environment, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cache = CompileCache(root, torch.device("cpu"), settings, environment=environment)
    hit = cache.load()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False))
    compiled = torch.compile(model, dynamic=False)
    X, Y = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    start = time.time()
    _, loss = compiled(X, Y)
    loss.backward()
    seconds = time.time() - start
    grads = [p.grad.double().sum().item() for p in model.parameters()]
    saved = cache.save()
    summary = cache.summary()
    # A second run in the same process (a Tune trial actor reused) compiles nothing new, and says so.
    again = CompileCache(root, torch.device("cpu"), settings, environment=environment)
    torch.compile(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False)),
                  dynamic=False)(X, Y)[1].backward()
    print(json.dumps(dict(hit=hit, saved=saved, loss=loss.item(), grads=grads, seconds=seconds,
                          inductor=dict(counters["inductor"]), aot_autograd=dict(counters["aot_autograd"]),
                          summary=summary, location=cache.location, summary_again=again.summary())))
""")


def compile_one_step(root, tmp_path, name, environment=ENVIRONMENT) -> dict:
    """Run COMPILE_ONE_STEP in a fresh process whose own inductor and Triton caches start empty."""
    caches = tmp_path / f"{name}-process-caches"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), TRITON_CACHE_DIR=str(caches / "triton"),
               **FAST_CPU_COMPILE)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ONE_STEP, str(root), environment, json.dumps(SETTINGS)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cold_then_warm(tmp_path_factory):
    """One cold process that compiles and saves, then a warm one that loads the same cache root."""
    tmp_path = tmp_path_factory.mktemp("compile-cache")
    root = tmp_path / "storage"
    cold = compile_one_step(root, tmp_path, "cold")
    saved_file = (root / "compile-cache" / f"{cache_key(ENVIRONMENT, SETTINGS)}.bin").stat()
    warm = compile_one_step(root, tmp_path, "warm")
    return root, cold, warm, saved_file


def test_a_fresh_process_hits_what_another_compiled_and_computes_the_same(cold_then_warm):
    root, cold, warm, saved_file = cold_then_warm
    assert not cold["hit"] and cold["saved"] and ": miss; graphs: 0 cached, 2 compiled; saved" in cold["summary"]
    assert cold["inductor"]["fxgraph_cache_miss"] > 0 and "fxgraph_cache_hit" not in cold["inductor"]
    assert warm["hit"] and "graphs: 2 cached, 0 compiled" in warm["summary"]
    assert cold["summary_again"].endswith("graphs: none new (compiled earlier in this process)")
    # forward and backward graphs come from the file: no graph is lowered again
    assert warm["inductor"]["fxgraph_cache_hit"] == cold["inductor"]["fxgraph_cache_miss"]
    assert "fxgraph_cache_miss" not in warm["inductor"] and warm["aot_autograd"]["autograd_cache_hit"] == 1
    assert (warm["loss"], warm["grads"]) == (cold["loss"], cold["grads"])
    # everything the warm process used came from the file: it is not rewritten
    assert not warm["saved"]
    file = root / "compile-cache" / f"{cache_key(ENVIRONMENT, SETTINGS)}.bin"
    assert (file.stat().st_mtime_ns, file.stat().st_size) == (saved_file.st_mtime_ns, saved_file.st_size)
    assert [p.name for p in file.parent.iterdir()] == [file.name]  # no temporary left


def test_another_torch_or_device_is_a_miss(cold_then_warm, tmp_path, monkeypatch):
    """A different environment names a different file, so a new torch or GPU never reads old artifacts."""
    root = cold_then_warm[0]
    other = CompileCache(str(root), torch.device("cpu"), SETTINGS, environment="torch9.9-py399-cuda-sm100")
    assert other.key != cache_key(ENVIRONMENT, SETTINGS) and not other.load() and ": miss;" in other.summary()
    here = environment_key(torch.device("cpu"))
    monkeypatch.setattr(torch, "__version__", "9.9.0")
    assert environment_key(torch.device("cpu")) != here
    changed_model = dict(SETTINGS, n_layer=2)
    assert cache_key(ENVIRONMENT, changed_model) != cache_key(ENVIRONMENT, SETTINGS)


def test_each_gpu_index_has_its_own_file_written_by_one_rank(monkeypatch):
    """torch keys a graph by its inputs' device: a worker on cuda:1 compiles other graphs than one on
    cuda:0 (measured: a restarted 2-GPU run whose rank 1 found only rank 0's graphs compiled again for
    17 s). So the file is per device index, and the first node's rank on each index writes it."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    first, second = (environment_key(torch.device("cuda", index)) for index in (0, 1))
    assert first.endswith("-sm90-gpu0") and second.endswith("-sm90-gpu1")
    # 2 nodes of 2 GPUs: ranks 0 and 1 (node 0) write; ranks 2 and 3 (node 1, local ranks 0 and 1) read.
    gpu = [cache_writer(rank, local, torch.device("cuda", local)) for rank, local in ((0, 0), (1, 1), (2, 0), (3, 1))]
    assert gpu == [True, True, False, False]
    # On CPU every rank's graphs are the same: rank 0 alone writes.
    cpu = [cache_writer(rank, local, torch.device("cpu")) for rank, local in ((0, 0), (1, 1), (2, 0), (3, 1))]
    assert cpu == [True, False, False, False]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_cache_file_is_a_one_line_warning_and_a_miss(cold_then_warm, tmp_path, damage, capfd):
    good = (cold_then_warm[0] / "compile-cache" / f"{cache_key(ENVIRONMENT, SETTINGS)}.bin").read_bytes()
    root = tmp_path / "storage"
    cache = CompileCache(str(root), torch.device("cpu"), SETTINGS, environment=ENVIRONMENT)
    write_small_file(cache.location, b"not a cache file" if damage == "garbage" else good[: len(good) // 2])
    warnings = []
    cache.warn = warnings.append
    assert not cache.load() and ": miss;" in cache.summary()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: compile cache {cache.location} not used")
    assert "Traceback" not in capfd.readouterr().err  # torch's own logged traceback is kept off the console


def test_an_unreadable_storage_is_a_warning_and_nothing_is_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("storage root is a file, not a folder")
    warnings = []
    cache = CompileCache(str(blocker), torch.device("cpu"), SETTINGS, warn=warnings.append, environment=ENVIRONMENT)
    assert not cache.load() and len(warnings) == 1
    torch.compile(lambda x: x + 1)(torch.ones(2))  # an artifact to save
    assert not cache.save() and len(warnings) == 2 and "not saved" in warnings[1]


def test_only_the_writer_saves(tmp_path):
    cache = CompileCache(str(tmp_path), torch.device("cpu"), SETTINGS, writer=False, environment=ENVIRONMENT)
    torch.compile(lambda x: x * 3)(torch.ones(2))
    assert not cache.save() and not (tmp_path / "compile-cache").exists()


def test_a_uri_storage_round_trips_through_pyarrow_without_temporaries(s3_server, cold_then_warm):
    """s3:// (a moto server on loopback) through pyarrow.fs: a miss, then the saved bytes, no temporary left."""
    import pyarrow.fs

    bucket = s3_server.create_bucket()
    cache = CompileCache(f"{bucket}/runs", torch.device("cpu"), SETTINGS, environment=ENVIRONMENT)
    assert cache.location == f"{bucket}/runs/compile-cache/{cache_key(ENVIRONMENT, SETTINGS)}.bin"
    assert not cache.load() and read_small_file(cache.location, limit=None) is None
    saved = (cold_then_warm[0] / "compile-cache" / f"{cache_key(ENVIRONMENT, SETTINGS)}.bin").read_bytes()
    write_small_file(cache.location, b"an older file")
    write_small_file(cache.location, saved)
    assert read_small_file(cache.location, limit=None) == saved
    assert cache.load() and cache.loaded_bytes == len(saved)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(f"{bucket}/runs/compile-cache")
    listing = filesystem.get_file_info(pyarrow.fs.FileSelector(path))
    assert [info.base_name for info in listing] == [f"{cache_key(ENVIRONMENT, SETTINGS)}.bin"]


# DDP over a 1-rank gloo group, compiled; in a process of its own, which ends without tearing the group
# down: freeing DDP's reducer after destroy_process_group once left the group's destructor waiting
# forever for its threads, and a CI run hung there.
DDP_GRAPHS = """
import json, os, sys
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from raygpt.config.schema import TrainConfig
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import wrap_model

split, rendezvous = sys.argv[1] == "True", sys.argv[2]
dist.init_process_group("gloo", store=dist.FileStore(rendezvous, 1), rank=0, world_size=1)
torch.manual_seed(0)
# Weights over DDP's 25 MB bucket: two buckets, so a split graph really splits.
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=128, block_size=8, vocab_size=50304, bias=False))
x = torch.arange(16).reshape(2, 8) % 32
eager_loss = model(x, x)[1].item()
cfg = TrainConfig(device="cpu", dtype="float32", compile=True, ddp_split_graphs=split)
wrapped = wrap_model(model, cfg, 2, torch.device("cpu"), "float32")  # DDP, here over a 1-rank group
_, loss = wrapped.train(x, x)
loss.backward()
aot = counters["aot_autograd"]
kept = aot["autograd_cache_miss"] + aot["autograd_cache_hit"]
found = dict(bypassed=aot["autograd_cache_bypass"], kept=kept, loss=loss.item(), eager_loss=eager_loss)
print(json.dumps(found), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("split", [False, True])
def test_ddp_compiles_one_graph_that_autograd_cache_keeps_unless_split(tmp_path, split):
    """ddp_split_graphs=False (the default) compiles the DDP model as one graph, which AOTAutograd's cache
    can keep (a restarted worker skips tracing it again); True splits it at DDP's buckets, and that cache
    refuses the pieces. Both compute the same loss."""
    command = [sys.executable, "-c", DDP_GRAPHS, str(split), str(tmp_path / "rendezvous")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert (found["bypassed"] > 0) == split
    assert (found["kept"] > 0) != split
    assert found["loss"] == pytest.approx(found["eager_loss"], abs=1e-5)
