"""What the launcher asks of a Ray it starts itself, for a shorter worker-group start (issue 19)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raygpt.driver.ray_cluster import job_runtime_env

REPO = Path(__file__).resolve().parents[1]


def test_joined_cluster_gets_the_storage_settings(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert job_runtime_env(joined=True)["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"


def test_ray_started_here_gets_no_runtime_env(monkeypatch):
    # Its workers inherit this environment; a runtime_env would only keep Ray from reusing idle processes.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert job_runtime_env(joined=False) is None


def test_no_credentials_no_runtime_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_")):
            monkeypatch.delenv(name)
    assert job_runtime_env(joined=True) is None


# A launcher's Ray, started in a process of its own (the session's shared Ray is already up in this one):
# what its job carries, and how many Python worker processes its raylet started.
CONNECT_AND_COUNT = """
import json, os, re, sys, time
from pathlib import Path
import ray
from raygpt.driver.ray_cluster import connect
connect(None)
time.sleep(3)
raylet_log = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "raylet.out"
started = len(re.findall("Started worker process", raylet_log.read_text()))
worker_env = ray.get(ray.remote(lambda: os.environ.get("AWS_ENDPOINT_URL")).options(num_cpus=0).remote())
print(json.dumps(dict(runtime_env=ray.get_runtime_context().runtime_env, worker_env=worker_env, started=started)))
"""


@pytest.mark.ray
def test_launchers_own_ray_starts_no_idle_processes(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rg-t-")  # short: Ray's socket paths must be
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "RAY_TMPDIR": ray_tmp,  # no ray_current_cluster there: the launcher starts its own Ray
        "RAY_USAGE_STATS_ENABLED": "0",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", CONNECT_AND_COUNT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["runtime_env"] == {}  # no job runtime_env ...
    assert found["worker_env"] == "http://127.0.0.1:9000"  # ... and the workers have the settings all the same
    # Before any task: the autoscaling coordinator's process alone, not one idle process per CPU.
    assert found["started"] <= 1


def test_packages_without_bytecode_are_found_and_the_fix_silences_them(tmp_path):
    # A container's torch: no .pyc beside its source (pip --no-compile) and none written
    # (PYTHONDONTWRITEBYTECODE); an empty pycache prefix stands in for the missing .pyc files.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(tmp_path / "none")}
    probe = "from raygpt.driver.bytecode import packages_without_bytecode as p; print(' '.join(p()))"

    def without_bytecode() -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        return done.stdout.split()

    folders = without_bytecode()
    assert [Path(folder).name for folder in folders][:2] == ["torch", "sympy"], folders
    assert (Path(folders[0]) / "__init__.py").is_file()
    # The fix the launcher names, compileall, writes the bytecode Python reads (for numpy's __init__.py
    # alone here, to be quick): numpy is no longer named.
    numpy_init = Path(next(folder for folder in folders if Path(folder).name == "numpy")) / "__init__.py"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(numpy_init)], env=env, check=True)
    assert [Path(folder).name for folder in without_bytecode()][:2] == ["torch", "sympy"]
    assert "numpy" not in [Path(folder).name for folder in without_bytecode()]
    # Where Python writes bytecode itself, the first process does it: nothing to name.
    env.pop("PYTHONDONTWRITEBYTECODE")
    assert without_bytecode() == []


def test_the_launcher_names_the_fix_for_missing_bytecode(monkeypatch, capsys):
    from raygpt.driver import preflight

    monkeypatch.setattr(preflight, "packages_without_bytecode", lambda: ["/site/torch", "/site/sympy"])
    preflight.check_bytecode()
    out = capsys.readouterr().out
    assert out.startswith("raygpt: warning: torch, sympy have no compiled bytecode") and out.count("\n") == 1
    assert out.rstrip().endswith("Once: python -m compileall -q -j 0 /site/torch /site/sympy")
    monkeypatch.setattr(preflight, "packages_without_bytecode", lambda: [])
    preflight.check_bytecode()
    assert capsys.readouterr().out == ""


class RecordingWorkerGroup:
    """Stands in for Ray's worker group: records what a backend asks the workers to run."""

    def __init__(self):
        self.asked = []

    def __len__(self):
        return 2

    def execute_async(self, fn, *args, **kwargs):
        self.asked.append(fn.__name__)
        return []


@pytest.mark.ray
def test_a_failed_group_is_not_held_up_by_tearing_down_its_process_group(ray_local):
    # Ray's own backend asks every worker to destroy its process group, and a survivor of a dead rank
    # blocks there under NCCL; raygpt's leaves the group to the kill that follows, with Ray's set-up.
    from ray.train.torch import TorchConfig

    from raygpt.driver.trainer import build_trainer  # noqa: F401 - the trainer the launcher builds uses it
    from raygpt.worker.session import NoTeardownTorchConfig

    stock = RecordingWorkerGroup()
    TorchConfig(backend="gloo").backend_cls().on_shutdown(stock, TorchConfig(backend="gloo"))
    assert stock.asked == ["_shutdown_torch"]
    ours = RecordingWorkerGroup()
    config = NoTeardownTorchConfig(backend="gloo")
    config.backend_cls().on_shutdown(ours, config)
    assert ours.asked == []
    assert config.backend_cls.on_start is TorchConfig(backend="gloo").backend_cls.on_start
    assert isinstance(config, TorchConfig) and config.backend == "gloo"


def test_a_run_without_compile_never_imports_dynamo():
    # torch._dynamo's import takes seconds in every worker process (more without bytecode); a run with
    # compile=False has no use for it.
    probe = """
import sys, torch
from raygpt.config.schema import TrainConfig
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.parallel import wrap_model
import raygpt.worker.loop
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65))
wrapped = wrap_model(model, TrainConfig(compile=False), 1, torch.device("cpu"), "float32")
assert wrapped.train is model
print("torch._dynamo" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("env", [{"TMPDIR": "tmpdir"}, {"RAY_TMPDIR": "raytmp", "TMPDIR": "tmpdir"}, {}])
def test_local_cluster_file_is_the_one_ray_start_writes(env, monkeypatch, tmp_path):
    """`ray start` records the cluster a plain ray.init() joins under $RAY_TMPDIR, else $TMPDIR, then /ray:
    the launcher looks for it there, with Ray's function or with its own rule where Ray's moved."""
    import sys

    from ray._common.utils import get_ray_address_file

    from raygpt.ray_compat import local_cluster_file

    for name in ("TMPDIR", "RAY_TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    expected = Path(get_ray_address_file(None))
    assert local_cluster_file() == expected
    base = env.get("RAY_TMPDIR", env.get("TMPDIR"))
    assert expected == (tmp_path / base if base else Path("/tmp")) / "ray" / "ray_current_cluster"
    monkeypatch.setitem(sys.modules, "ray._common.utils", None)  # as if Ray had moved it
    assert local_cluster_file() == expected


def test_a_stale_cluster_record_is_named_and_not_joined(tmp_path, capsys):
    """A cluster stopped without `ray stop` (its `ray start --block` killed) leaves ray_current_cluster
    behind; ray.init would retry its address forever. A live one is joined as before."""
    import socket

    from raygpt.driver.ray_cluster import recorded_cluster_answers

    record = tmp_path / "ray_current_cluster"
    assert not recorded_cluster_answers(record)  # no record: nothing to join, nothing said
    assert capsys.readouterr().out == ""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        record.write_text(f"127.0.0.1:{listening.getsockname()[1]}")
        assert recorded_cluster_answers(record)
    # The port is closed now, as a stopped head's is.
    assert not recorded_cluster_answers(record)
    out = capsys.readouterr().out
    assert f"the Ray cluster recorded in {record} (127.0.0.1:" in out and "does not answer" in out
    assert "starting a Ray instance here" in out
