"""CommunicatorWarmup: the process group's first collective runs in a thread while the worker sets up.

On a GPU it makes NCCL's communicator; here the same thread runs its collective over gloo, between real
processes, to check what the loop relies on: start() returns while the collective still waits for the
other rank, wait() ends it, collectives after it work, and an error in the thread reaches the caller."""

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raygpt.core.parallel import CommunicatorWarmup


def wait_for(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def warmup_worker(rank: int, folder: str) -> None:
    folder = Path(folder)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(str(folder / "rendezvous"), 2), rank=rank, world_size=2)
    try:
        warmup = CommunicatorWarmup(torch.device("cpu"), enabled=True)
        if rank == 1:
            wait_for(folder / "rank0-started")  # rank 0's collective cannot end before this rank joins
        warmup.start()
        if rank == 0:
            still_waiting = warmup.thread.is_alive()  # start() did not block on the absent rank
            (folder / "rank0-started").touch()
        warmup.wait()
        after = torch.tensor([float(rank + 1)])
        dist.all_reduce(after)  # the loop's own collectives follow the warm-up's
        (folder / f"rank{rank}.txt").write_text(f"{after.item()} {rank != 0 or still_waiting}")
    finally:
        dist.destroy_process_group()


def test_the_warmup_collective_runs_beside_set_up_and_the_loop_goes_on_after_it(tmp_path):
    mp.spawn(warmup_worker, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "3.0 True"


def test_an_error_in_the_warmup_reaches_the_loop():
    assert not dist.is_initialized()
    warmup = CommunicatorWarmup(torch.device("cpu"), enabled=True)
    warmup.start()
    with pytest.raises((ValueError, RuntimeError), match="process group"):
        warmup.wait()
    warmup.wait()  # raised once; nothing is left to wait for


def test_only_an_nccl_group_of_several_ranks_is_warmed():
    assert not CommunicatorWarmup.for_worker(2, torch.device("cpu")).enabled  # no process group here
    assert not CommunicatorWarmup.for_worker(1, torch.device("cpu")).enabled
    idle = CommunicatorWarmup.for_worker(1, torch.device("cpu"))
    idle.start()
    assert idle.thread is None
    idle.wait()
