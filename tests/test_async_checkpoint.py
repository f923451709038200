"""Checkpoints written in the background: training pauses only for the copy to host memory, the copy (not
the live weights) is what gets written, a folder is reported to Ray only once it is complete, at most one
save is in flight, and a process killed mid-write leaves the last complete checkpoint to resume from."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_LOCAL_RUN

from raygpt.core import checkpoint
from raygpt.core.checkpoint import TrainState
from raygpt.core.model import GPT, GPTConfig
from raygpt.worker.checkpointer import Checkpointer
from raygpt.worker.session import OrderedRayCalls

REPO = Path(__file__).resolve().parents[1]


def tiny_state() -> TrainState:
    torch.manual_seed(0)
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=False, vocab_size=32, dropout=0.0)
    model = GPT(GPTConfig(**args))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", False)
    model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))[1].backward()
    optimizer.step()  # AdamW state exists
    state = TrainState(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), args, {}, False, False)
    state.iter_num = 10
    return state


def test_the_host_copy_is_written_not_the_weights_training_goes_on_changing(tmp_path):
    state = tiny_state()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    release = threading.Event()
    reported = []

    def report(ray_checkpoint):
        release.wait(30)  # hold the background thread: training runs on meanwhile
        folder = Path(ray_checkpoint.path)
        reported.append(checkpoint.load(folder / "ckpt.pt"))  # complete when reported

    checkpointer = Checkpointer(tmp_path, rank=0, calls=OrderedRayCalls(background=True))
    checkpointer.save(state, None, report)
    with torch.no_grad():
        for param in state.model.parameters():
            param.add_(1.0)  # what the next optimizer steps do to the live weights
    state.iter_num = 11
    release.set()
    checkpointer.calls.close()
    saved = reported[0]
    assert saved["iter_num"] == 10
    for key, tensor in before.items():
        assert torch.equal(saved["model"][key], tensor), key
    assert checkpoint.load(tmp_path / "ckpt.pt")["iter_num"] == 10
    assert not list(tmp_path.glob(".ray-upload-*")), "upload folders are removed once Ray has the checkpoint"


def test_reports_keep_their_order_and_one_save_is_in_flight(tmp_path):
    state = tiny_state()
    release = threading.Event()
    order = []

    def slow_report(ray_checkpoint):
        release.wait(30)
        order.append(("save", ray_checkpoint is not None))

    checkpointer = Checkpointer(tmp_path, rank=0, calls=OrderedRayCalls(background=True))
    checkpointer.save(state, None, slow_report)
    checkpointer.calls.report(lambda ray_checkpoint: order.append(("eval", ray_checkpoint)))
    second = threading.Thread(target=checkpointer.save, args=(state, None, lambda c: order.append(("save 2", 1))))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "a second save must wait for the one in flight"
    assert order == []
    release.set()
    second.join(30)
    checkpointer.calls.close()
    assert order == [("save", True), ("eval", None), ("save 2", 1)]


def test_a_failed_background_write_stops_training_at_the_next_save(tmp_path):
    state = tiny_state()
    (tmp_path / "ckpt.pt").mkdir()  # the atomic rename onto a folder fails
    checkpointer = Checkpointer(tmp_path, rank=0, calls=OrderedRayCalls(background=True))
    checkpointer.save(state, None, lambda c: None)
    deadline = time.time() + 30
    while checkpointer.calls.pending and not checkpointer.calls.pending[0].done() and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):
        checkpointer.save(state, None, lambda c: None)


# Run through the CLI in a subprocess whose second checkpoint write stops half way and waits to be killed.
STALLED_WRITE = """
import sys, time
from pathlib import Path
from raygpt import launch
from raygpt.core import checkpoint
from raygpt.storage import files

marker, writes = Path(sys.argv[1]), []
original = checkpoint.save_atomic

def save_atomic(state, path):
    writes.append(path)
    if len(writes) < 2:
        return original(state, path)
    def half_then_stall(f):
        f.write(b"half of a checkpoint")
        f.flush()
        marker.write_text(str(state["iter_num"]))
        time.sleep(600)
    files.write_atomic(path, half_then_stall)

checkpoint.save_atomic = save_atomic
sys.exit(launch.main(sys.argv[2:]))
"""


def test_a_process_killed_mid_write_resumes_from_the_last_complete_checkpoint(tmp_path, char_data):
    out, marker = tmp_path / "out", tmp_path / "stalled"
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--out_dir={out}", f"--storage_path={tmp_path / 'ray'}"]
    argv += ["--max_iters=40", "--eval_interval=4", "--log_interval=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", STALLED_WRITE, str(marker), *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    watchdog = threading.Timer(120, process.kill)  # a hang fails the test instead of stalling the suite
    watchdog.start()
    try:
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.startswith("iter 11:") and marker.exists():
                break
        # The iter-8 write never finishes, so iterations 8-11 ran while it was in flight ...
        assert marker.exists() and marker.read_text() == "8", "".join(seen[-20:])
        assert any(line.startswith("iter 11:") for line in seen), "".join(seen[-20:])
    finally:
        watchdog.cancel()
        process.send_signal(signal.SIGKILL)  # ... and the process dies in the middle of that write
        process.wait(30)
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 4  # the last complete one, untouched
    assert list(out.glob(".ckpt.pt.*")), "the killed write's temporary file is what a crash leaves"

    rerun = subprocess.run([sys.executable, "-m", "raygpt.launch", *argv], capture_output=True, text=True, env=env,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "from iter 4" in rerun.stdout, rerun.stdout[-2000:]
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 40
    assert not list(out.glob(".ckpt.pt.*")), "the rerun removes what the killed write left"


def host_buffers(state) -> set[int]:
    """Where the tensors of nested dicts and lists live (DTensors: their local shards)."""
    if isinstance(state, dict):
        return set().union(*(host_buffers(value) for value in state.values()))
    if isinstance(state, (list, tuple)):
        return set().union(*(host_buffers(value) for value in state))
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return {local.data_ptr()} if local.numel() else set()
    return set()


def test_sharded_background_saves_reuse_one_host_copy_and_write_each_saves_weights(tmp_path):
    """FSDP's background saves copy the shards into host buffers kept from the previous save; the second
    save must still write its own weights, not the first's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(str(tmp_path / "rendezvous"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        state = tiny_state()
        for block in state.model.transformer.h:
            fully_shard(block)
        fully_shard(state.model)
        state.optimizer = state.model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", False)
        state.sharded = True
        saved_weights = []

        def report(ray_checkpoint):
            saved, _ = checkpoint.read_checkpoint(ray_checkpoint.path)
            saved_weights.append((saved["iter_num"], checkpoint.whole_model_state(saved)))

        checkpointer = Checkpointer(tmp_path / "out", rank=0, calls=OrderedRayCalls(background=True), sharded=True)
        checkpointer.save(state, None, report)
        checkpointer.calls.wait()
        first_copy = host_buffers(checkpointer.stager.state_dict_cache)
        expected = [{k: v.full_tensor().clone() for k, v in state.model.state_dict().items()}]
        with torch.no_grad():
            for param in state.model.parameters():
                param.add_(1.0)
        state.iter_num = 11
        checkpointer.save(state, None, report)
        checkpointer.calls.close()
        expected.append({k: v.full_tensor().clone() for k, v in state.model.state_dict().items()})
        second_copy = host_buffers(checkpointer.stager.state_dict_cache)
    finally:
        dist.destroy_process_group()
    assert first_copy == second_copy, "the second save reuses the first one's host buffers"
    assert [iter_num for iter_num, _ in saved_weights] == [10, 11]
    for (_, weights), wanted in zip(saved_weights, expected):
        for key, tensor in wanted.items():
            assert torch.equal(weights[key], tensor), key
    assert not torch.equal(saved_weights[0][1]["lm_head.weight"], saved_weights[1][1]["lm_head.weight"])
