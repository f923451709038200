"""Training on a real Ray local cluster: CPU workers, gloo, a tiny GPT on the real shakespeare_char data."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN

from raygpt import launch
from raygpt.config.schema import TrainConfig
from raygpt.core import checkpoint
from raygpt.core.model import GPT, GPTConfig
from raygpt.core.step import resolve_dtype
from raygpt.driver.plan import RunPlan, plan_resources
from raygpt.driver.preflight import absolute_paths
from raygpt.driver.trainer import build_trainer
from raygpt.errors import LaunchError

TINY = TINY_RUN


def tiny_config(tmp_path, char_data, name="run", **overrides) -> TrainConfig:
    values = {
        **TINY,
        "data_dir": str(char_data),
        "out_dir": str(tmp_path / f"out-{name}"),
        "storage_path": str(tmp_path / "ray"),
        "run_name": name,
        **overrides,
    }
    return TrainConfig(**values)


def final_state(cfg: TrainConfig) -> dict:
    return checkpoint.load(f"{cfg.out_dir}/ckpt.pt")


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bfloat16_on_a_gpu_without_it_is_one_clear_error(monkeypatch):
    """Checked on the worker (the driver may have no GPU); the launcher prints the message as one line."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla T4")
    gpu = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"^dtype bfloat16 is not supported by Tesla T4; use --dtype=float16$"):
        resolve_dtype("bfloat16", gpu)
    assert resolve_dtype("auto", gpu) == "float16"  # auto falls back instead of failing
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"


@pytest.fixture(scope="module")
def one_worker_run(ray_local, tmp_path_factory, char_data):
    """One uninterrupted worker to iter 20 on Ray: a test of its own, and what the resume and local-mode tests
    compare against. Two CPUs (two torch threads, the summation order): local mode can have the same."""
    cfg = tiny_config(tmp_path_factory.mktemp("one-worker"), char_data, "one", cpus_per_worker=2)
    return cfg, launch.run(cfg)


def test_one_worker_learns_and_checkpoints(one_worker_run):
    cfg, result = one_worker_run
    first = math.log(65)  # an untrained char model's loss
    assert result.metrics["val_loss"] < first - 0.5
    assert Path(result.checkpoint.path).parent == Path(cfg.storage_path) / "one"  # in storage_path/run_name
    ray_state, _ = checkpoint.from_ray(result.checkpoint)
    assert ray_state["iter_num"] == 20
    out_state = final_state(cfg)
    assert_same_weights(ray_state["model"], out_state["model"])
    with torch.device("meta"):  # nanoGPT's key names: no prefix from a wrapper
        assert out_state["model"].keys() == GPT(GPTConfig(**out_state["model_args"])).state_dict().keys()
    assert out_state["best_val_loss"] == min(m["val_loss"] for _, m in result.best_checkpoints)


def test_a_run_resumes_exactly_and_on_any_worker_count(one_worker_run, tmp_path, char_data, capfd):
    """One uninterrupted worker to iter 20 against: the same run stopped at 10 and continued (bit-identical);
    2 workers to 10 (learning, their weights in sync), then 1 worker to 20 (the global batch does not
    depend on the worker count: equal within float summation order); and its checkpoint evaluated on 1
    and 2 workers (the same numbers)."""
    alone, _ = one_worker_run
    # The same run stopped at iter 10, then the same command again (same run_name + storage) to 20.
    stopped = tiny_config(tmp_path, char_data, "stopped", max_iters=10, cpus_per_worker=alone.cpus_per_worker)
    launch.run(stopped)
    resumed = launch.run(stopped.replace(max_iters=20))
    assert resumed.metrics["iter"] == 20
    a, b = final_state(alone), final_state(stopped)
    assert a["iter_num"] == b["iter_num"] == 20
    assert_same_weights(a["model"], b["model"])
    assert a["best_val_loss"] == b["best_val_loss"]

    switched = tiny_config(tmp_path, char_data, "switched", max_iters=10, num_workers=2)
    two_workers = launch.run(switched)
    assert two_workers.metrics["val_loss"] < math.log(65) - 0.5
    # Each rank fingerprints its weights at every eval; DDP must keep them identical.
    assert two_workers.metrics["weights_in_sync"] is True
    assert len(list((tmp_path / "ray" / "switched").glob("checkpoint_*/ckpt.pt"))) >= 1
    capfd.readouterr()
    launch.run(switched.replace(max_iters=20, num_workers=1))
    assert "changed since: workers 2 -> 1 (the same batches" in capfd.readouterr().out
    c = final_state(switched)
    assert c["iter_num"] == 20
    assert c["last_eval"]["val"] == pytest.approx(a["last_eval"]["val"], abs=1e-4)
    # 20 AdamW steps at lr 1e-2 grow the summation-order noise to ~5e-5; other batches would differ by ~1e-2.
    for key, tensor in a["model"].items():
        assert torch.allclose(tensor, c["model"][key], atol=2e-4), key

    # eval_only splits the eval windows across the workers: 1 and 2 workers report the same numbers.
    losses = []
    for workers in (1, 2):
        evaluated = launch.run(
            alone.replace(
                init_from="resume", eval_only=True, num_workers=workers, run_name=f"eval{workers}", eval_iters=5
            )  # fmt: skip
        )
        assert evaluated.checkpoint is None  # eval_only never writes a checkpoint
        numbers = json.loads((Path(alone.out_dir) / "eval.json").read_text())
        assert numbers["iter"] == 20 and numbers["eval_iters"] == 5
        losses.append((numbers["train_loss"], numbers["val_loss"]))
    # Equal up to the order of the sums (~1e-7); other eval windows would differ by ~1e-2.
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_an_elastic_run_takes_the_workers_the_cluster_has(ray_local, tmp_path, char_data, capfd):
    cfg = tiny_config(tmp_path, char_data, "elastic", num_workers=1, max_workers=2)
    result = launch.run(cfg)
    assert result.metrics["iter"] == 20 and result.metrics["weights_in_sync"] is True
    assert "with 1-2 CPU workers (elastic)" in capfd.readouterr().out


def test_float16_uses_the_grad_scaler(tmp_path, char_data):
    # float16 autocast runs on CPU in recent torch; the launcher refuses it for users, so build the trainer directly.
    cfg = tiny_config(tmp_path, char_data, "fp16", dtype="float16", max_iters=10, local_mode=True, cpus_per_worker=1)
    plan = RunPlan(num_workers=1, use_gpu=False, cpus_per_worker=1, run_name="fp16")
    build_trainer(absolute_paths(cfg), plan).fit()
    scaler_state = final_state(cfg)["scaler"]
    # The scaler counted each of the 10 steps (none overflowed at its initial scale of 2**16).
    assert (scaler_state["scale"], scaler_state["_growth_tracker"]) == (2.0**16, 10)


def history_keys(path) -> set:
    """Keys of the history records in a .wandb file (a LevelDB-style log of protobuf Records)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7  # 7: the ':W&B' file header
    keys, record = set(), b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk  # FULL / FIRST start a record
        if kind in (1, 4):  # FULL / LAST end one
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            if parsed.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in parsed.history.item}
    return keys


def test_wandb_offline_logs_the_keys(ray_local, tmp_path, char_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_config(tmp_path, char_data, "wandb", wandb_log=True, max_iters=10, wandb_project="raygpt-test")
    launch.run(cfg)
    runs = list((tmp_path / "out-wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = history_keys(next(runs[0].glob("run-*.wandb")))
    assert {"train/loss", "val/loss", "lr", "tokens/s"} <= logged
    assert final_state(cfg)["wandb_run_id"]


def test_local_mode_trains_in_process_like_one_ray_worker(one_worker_run, tmp_path, char_data):
    """Ray Train's local mode (num_workers=0 underneath) runs the same loop in this process: same weights."""
    on_ray, _ = one_worker_run
    # The same CPU count gives the same torch thread count, hence the same float summation order.
    local = tiny_config(tmp_path, char_data, "local", local_mode=True, cpus_per_worker=on_ray.cpus_per_worker)
    result = launch.run(local)
    assert result.path is None  # nothing went through Ray storage
    assert result.metrics["val_loss"] == final_state(on_ray)["best_val_loss"]
    assert_same_weights(final_state(local)["model"], final_state(on_ray)["model"])


LOCAL_RUN = """
import sys
from raygpt import launch
from raygpt.driver.plan import RunPlan, plan_resources
from raygpt.driver.preflight import absolute_paths
from raygpt.driver.trainer import build_trainer
from raygpt.errors import LaunchError
sys.exit(launch.main(sys.argv[1:]))
"""


def test_local_mode_starts_no_ray_and_listens_on_nothing(tmp_path, char_data):
    """A real CLI run in local mode: no Ray process is spawned and no socket is put in LISTEN state."""
    import subprocess
    import sys
    import time

    import psutil

    args = [
        f"--{k}={v}"
        for k, v in {
            **TINY,
            "data_dir": char_data,
            "out_dir": tmp_path / "out-solo",
            "local_mode": True,
            "cpus_per_worker": 1,  # one torch thread: no spinning threads fighting over a busy machine's cores
            "max_iters": 30,
        }.items()
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", LOCAL_RUN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watched, listening, children = psutil.Process(process.pid), set(), set()
    while process.poll() is None:
        try:
            listening |= {c.laddr for c in watched.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            children |= {child.name() for child in watched.children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    output = process.stdout.read()
    assert process.returncode == 0, output[-3000:]
    assert "Ray Train local mode" in output and "best val loss" in output
    assert not listening and not children


def test_nanogpt_data_order_needs_one_worker(ray_local, tmp_path, char_data):
    cfg = tiny_config(tmp_path, char_data, "two", data_order="nanogpt", num_workers=2, cpus_per_worker=1)
    with pytest.raises(LaunchError, match="data_order=nanogpt .* needs num_workers=1, not 2"):
        plan_resources(cfg)


def test_nanogpt_data_order_resume_equals_uninterrupted(tmp_path, char_data):
    """The checkpoint keeps the random stream and the batch already drawn: a resume continues exactly."""
    options = dict(local_mode=True, cpus_per_worker=1, data_order="nanogpt", dropout=0.1)
    straight = tiny_config(tmp_path, char_data, "replay-straight", **options)
    launch.run(straight)
    stopped = tiny_config(tmp_path, char_data, "replay-stopped", max_iters=10, **options)
    launch.run(stopped)
    launch.run(stopped.replace(max_iters=20, init_from="resume"))
    a, b = final_state(straight), final_state(stopped)
    assert a["iter_num"] == b["iter_num"] == 20
    assert_same_weights(a["model"], b["model"])
