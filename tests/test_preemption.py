"""Stopping on notice: PreemptionWatch's cadence and its one decision for all ranks (fast tier); SIGTERM to
a local-mode run; and a real preemption, `ray drain-node` on a loopback cluster node running the workers."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TINY_LOCAL_RUN, TINY_RUN

import raygpt
from raygpt import launch
from raygpt.worker import preemption
from raygpt.worker.preemption import EXIT_TERMINATED, PreemptionWatch, Terminated

CODE = str(Path(raygpt.__file__).resolve().parents[1])  # the raygpt under test, for subprocesses and nodes


class FakeInfo:
    """What ray.train.get_preemption_info returns (its PreemptionInfo's fields that the watch reads)."""

    def __init__(self, nodes: dict[str, list[int]], deadline_ms: int | None = None):
        self.preempted_node_to_ranks, self.deadline_ms = nodes, deadline_ms

    @property
    def preempted_node_ids(self):
        return sorted(self.preempted_node_to_ranks)

    @property
    def preempted_ranks(self):
        return sorted({r for ranks in self.preempted_node_to_ranks.values() for r in ranks})


def quiet_watch(poll, every, run_in_order=None):
    return PreemptionWatch(poll, every, run_in_order, say=lambda text: None)


class MaxOverRanks:
    """The loop's MAX all-reduce for ranks run as threads of this process: agree_for(rank) is a rank's
    `agree`, returning the largest value every rank passed at this call."""

    def __init__(self, world_size: int):
        self.barrier, self.values = threading.Barrier(world_size, timeout=10), [0] * world_size

    def agree_for(self, rank: int):
        def agree(value: int) -> int:
            self.values[rank] = value
            self.barrier.wait()
            decided = max(self.values)
            self.barrier.wait()
            return decided

        return agree


def run_ranks(run, world_size: int = 2) -> None:
    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def test_polls_only_every_log_interval():
    polled = []
    watch = quiet_watch(lambda: polled.append(1), every=5)
    for iter_num in range(23):
        watch.notice(iter_num)
    assert len(polled) == 5  # iterations 0, 5, 10, 15, 20


def test_polls_queue_behind_the_reports_without_stopping_the_loop():
    """Ray numbers its collectives per process: a poll made while the checkpointer's thread reports would
    pair with another rank's report. Submitted to that thread, it comes after the report on every rank."""
    order = []

    def report():
        time.sleep(0.2)
        order.append("report")

    with ThreadPoolExecutor(1) as checkpointer_thread:
        checkpointer_thread.submit(report)
        watch = quiet_watch(lambda: order.append("poll"), every=1, run_in_order=checkpointer_thread.submit)
        started = time.perf_counter()
        assert watch.notice(0) is None
        assert time.perf_counter() - started < 0.1  # the loop went on
    assert order == ["report", "poll"]


def test_a_notice_comes_once_per_preemption():
    current = {"info": None}
    watch = quiet_watch(lambda: current["info"], every=1)
    seen = []
    for iter_num in range(30):
        if iter_num == 5:
            current["info"] = FakeInfo({"node-a": [1]}, deadline_ms=int((time.time() + 30) * 1000))
        if iter_num == 20:  # Ray merges a second node's preemption into the same info
            current["info"] = FakeInfo({"node-a": [1], "node-b": [2, 3]})
        notice = watch.notice(iter_num)
        if notice is not None:
            seen.append((iter_num, notice.ranks))
    assert seen == [(5, (1,)), (20, (1, 2, 3))]  # an answer that has come is read at once
    first_deadline = time.time() + 30
    assert watch.stopping.deadline is None  # the merged info carried none
    assert 25 < first_deadline - time.time() <= 30


def test_every_rank_stops_on_the_same_iteration():
    """Ray's barrier answers the k-th poll of every rank with rank 0's k-th view; polling on the same
    iterations keeps the k-th polls of all ranks at the same iteration, whatever each rank saw itself."""
    world_size, iters, every = 3, 40, 4
    sees_from = {0: 17, 1: 9, 2: 30}  # when each rank's own worker got the watcher's message
    rank0_views = []

    def poll_for(rank, progress):
        def poll():
            own = FakeInfo({"node-x": [1]}) if progress["iter"] >= sees_from[rank] else None
            if rank == 0:
                rank0_views.append(own)
            progress["polls"] += 1
            return rank0_views[progress["polls"] - 1]

        return poll

    stopped_at, poll_counts = {}, {}
    for rank in range(world_size):  # rank 0 first: the others' polls answer with its views
        progress = {"iter": 0, "polls": 0}
        watch = quiet_watch(poll_for(rank, progress), every)
        for progress["iter"] in range(iters):
            if watch.notice(progress["iter"]) is not None:
                stopped_at[rank] = progress["iter"]
                break
        poll_counts[rank] = progress["polls"]
    assert stopped_at == {0: 20, 1: 20, 2: 20}  # rank 0's first poll after its iter 17
    assert len(set(poll_counts.values())) == 1


def test_ranks_whose_answers_come_late_stop_with_the_others_and_never_wait():
    """Rank 1's polls are queued behind a long checkpoint write: its answers have not come, yet both ranks
    stop at the iteration where rank 0 read the notice (the agreement is a MAX all-reduce of the flag)."""
    ranks, stopped = MaxOverRanks(2), {}

    def never_answered(job):
        return Future()  # still queued behind the write

    def run(rank):
        current = {"iter": 0}
        poll = lambda: FakeInfo({"node-x": [1]}) if current["iter"] >= 10 else None  # noqa: E731
        watch = PreemptionWatch(poll, 2, None if rank == 0 else never_answered, say=lambda text: None,
                                agree=ranks.agree_for(rank))  # fmt: skip
        for current["iter"] in range(20):
            if watch.notice(current["iter"]) is not None:
                stopped[rank] = current["iter"]
                return

    run_ranks(run)
    assert stopped == {0: 10, 1: 10}


def test_a_notice_another_rank_read_first_gets_this_ranks_answer_by_the_save():
    """Rank 0 prints, but on a loaded machine another rank may read Ray's notice first: rank 0 says so
    without inventing ranks, and once its own answer has come (during the save) it says which ranks go and
    when, states the deadline with the save, and waits for Ray's restart until that deadline."""
    queued, said, waited = Future(), [], []
    watch = PreemptionWatch(lambda: None, 1, lambda job: queued, say=said.append,
                            agree=lambda flag: preemption.PREEMPTED)  # fmt: skip
    watch.wait_for_restart = waited.append
    notice = watch.notice(4)
    assert notice.deadline is None
    assert said == ["preemption notice at iter 4 (read by another rank first): saving a checkpoint"]
    deadline = time.time() + 30
    queued.set_result((FakeInfo({"node-x": [0, 1]}, deadline_ms=int(deadline * 1000)), False))
    watch.stop(4)
    assert re.fullmatch(r"preemption notice at iter 4: ranks \[0, 1\] lose their node in [\d.]+s: saving a checkpoint",
                        said[1])  # fmt: skip
    assert re.fullmatch(r"preemption: checkpoint at iter 4 saved [\d.]+s after the notice, [\d.]+s before the "
                        r"deadline", said[2])  # fmt: skip
    assert waited[0].deadline == pytest.approx(deadline, abs=0.01) and waited[0].ranks == (0, 1)


def test_sigterm_is_a_notice_at_the_next_boundary_then_terminated():
    before = signal.getsignal(signal.SIGTERM)
    restore = preemption.handle_sigterm()
    try:
        watch = quiet_watch(None, every=1)
        assert watch.notice(3) is None
        os.kill(os.getpid(), signal.SIGTERM)
        notice = watch.notice(4)
        assert notice is not None and notice.reason == "SIGTERM"
        with pytest.raises(Terminated):
            watch.stop(4)
        with pytest.raises(Terminated):  # a second SIGTERM does not wait for a checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is before
    assert not preemption.stop_requested.is_set()


def test_the_launchers_sigterm_stops_every_rank_at_once_and_ends_the_loop():
    """Only rank 1 has read the launcher's mark, while rank 0 sees a preemption notice at the same poll:
    the launcher's SIGTERM wins on both (a MAX over the ranks), and stop() returns for the loop to end."""
    ranks, stopped = MaxOverRanks(2), {}

    def run(rank):
        current = {"iter": 0}
        poll = lambda: FakeInfo({"node-x": [1]}) if rank == 0 and current["iter"] >= 6 else None  # noqa: E731
        asked = lambda: rank == 1 and current["iter"] >= 6  # noqa: E731
        watch = PreemptionWatch(poll, 2, say=lambda text: None, agree=ranks.agree_for(rank), stop_asked=asked)
        for current["iter"] in range(20):
            notice = watch.notice(current["iter"])
            if notice is not None:
                watch.stop(current["iter"])  # returns: the loop ends the run
                stopped[rank] = (current["iter"], notice.reason)
                return

    run_ranks(run)
    assert stopped == {0: (6, preemption.LAUNCHER_SIGTERM), 1: (6, preemption.LAUNCHER_SIGTERM)}


class FakeCalls:
    """OrderedRayCalls, each call made at once."""

    def report(self, report):
        report(None)

    def wait(self):
        pass


@pytest.mark.parametrize("reason", ["SIGTERM", preemption.LAUNCHER_SIGTERM, "preemption"])
@pytest.mark.parametrize("nonfinite_steps", [0, 3])
def test_a_notice_during_nonfinite_steps_saves_nothing_and_says_what_stays(reason, nonfinite_steps, monkeypatch):
    """The notice checkpoint keeps what the eval checkpoint keeps: weights a run of non-finite steps left
    behind are never saved over the last good checkpoint, whatever stops the run."""
    from types import SimpleNamespace

    from raygpt.core.step import NonFiniteGuard
    from raygpt.worker.loop import checkpoint_on_notice

    lines, reported, saved = [], [], []
    guard = NonFiniteGuard(max_in_a_row=0, device=torch.device("cpu"), announce=False)
    guard.in_a_row.fill_(nonfinite_steps)
    told = []
    watch = PreemptionWatch(None, 1, say=lines.append, tell_launcher=told.append)
    watch.stopping = preemption.Notice(reason, time.time())
    monkeypatch.setattr(watch, "wait_for_restart", lambda notice: lines.append("waiting for Ray's restart"))
    state = SimpleNamespace(iter_num=57, last_eval={"train": 1.5, "val": 1.6}, best_val_loss=1.6)
    run = SimpleNamespace(
        guard=guard, state=state, tokens_per_iter=100, watch=watch, calls=FakeCalls(),
        reporter=SimpleNamespace(to_ray=lambda metrics, checkpoint=None: reported.append((metrics, checkpoint))),
        checkpointer=SimpleNamespace(save=lambda state, batch, report: (saved.append(state.iter_num), report("ckpt"))),
    )  # fmt: skip
    try:
        checkpoint_on_notice(run, watch.stopping, lr=0.1, next_batch=None)
        terminated = None
    except Terminated as e:
        terminated = e
    assert (terminated is not None) == (reason == "SIGTERM")
    [(metrics, handed)] = reported
    assert metrics["iter"] == 57 and metrics[preemption.NONFINITE_STEPS] == nonfinite_steps
    if nonfinite_steps:
        unsaved = "no checkpoint at iter 57: its last 3 step(s) were not finite, and diverged weights are never saved"
        assert saved == [] and handed is None
        assert lines[0] == f"{reason}: {unsaved}; the last good checkpoint stays"
        assert told == ([unsaved] if reason == preemption.LAUNCHER_SIGTERM else [])
        assert terminated is None or terminated.not_saved == unsaved
    else:
        assert saved == [57] and handed == "ckpt"
        assert lines[0].startswith(f"{reason}: checkpoint at iter 57 saved")
        assert told == []
        assert terminated is None or terminated.not_saved == ""


def test_a_forgotten_wait_for_restart_fails_rather_than_hangs():
    watch = quiet_watch(None, every=1)
    long_gone = preemption.Notice("preemption", time.time() - 1000, deadline=time.time() - 500)
    with pytest.raises(RuntimeError, match="did not restart"):
        watch.wait_for_restart(long_gone, sleep=lambda s: pytest.fail("waited past the deadline"))


def test_notice_metrics_carry_the_last_eval():
    class State:
        iter_num, best_val_loss, last_eval = 37, 1.5, {"train": 1.4, "val": 1.6}

    metrics = preemption.notice_metrics(State(), 3e-4, 100, preemption.Notice("preemption", 0.0))
    assert metrics["iter"] == 37 and metrics["val_loss"] == 1.6 and metrics["best_val_loss"] == 1.5
    assert metrics["tokens_seen"] == 3700 and metrics["stopped_by"] == "preemption"


def lines_matching(pattern: str, text: str) -> list[re.Match]:
    return [m for m in (re.search(pattern, line) for line in text.splitlines()) if m]


def start_local_launcher(argv: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m raygpt.launch` in a process group (and session) of its own, as a batch job runs it."""
    return subprocess.Popen([sys.executable, "-m", "raygpt.launch", *argv], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": CODE, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def sigterm_once(launcher: subprocess.Popen, to_group: bool, after: Callable[[str], bool]) -> tuple[str, str]:
    """SIGTERM to the launcher (or its whole process group) once a line of its output passes `after`; what
    it printed (all of it), and its stderr."""
    out = []
    try:
        for line in launcher.stdout:
            out.append(line)
            if after(line):
                break
        if to_group:
            os.killpg(launcher.pid, signal.SIGTERM)  # start_new_session: the group's id is the launcher's pid
        else:
            launcher.send_signal(signal.SIGTERM)
        rest, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    return "".join(out) + rest, err


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-launcher", "to-its-process-group"])
def test_sigterm_checkpoints_a_local_mode_run_then_says_how_to_continue(tmp_path, char_data, to_group):
    out_dir = tmp_path / "out"
    argv = [*TINY_LOCAL_RUN, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000",
            "--log_interval=1", f"--data_dir={char_data}", f"--out_dir={out_dir}"]  # fmt: skip
    launcher = start_local_launcher(argv, tmp_path)
    out, err = sigterm_once(launcher, to_group, after=lambda line: line.startswith("iter 3:"))
    assert launcher.returncode == EXIT_TERMINATED, err
    [stopped] = lines_matching(r"^SIGTERM at iter (\d+)", out)
    [saved] = lines_matching(r"^SIGTERM: checkpoint at iter (\d+) saved", out)
    assert stopped.group(1) == saved.group(1)
    assert err.strip().splitlines()[-1] == (
        f"terminated: the latest checkpoint is {out_dir / 'ckpt.pt'}: run the same command again to continue from it"
    )
    saved_state = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert saved_state["iter_num"] == int(saved.group(1)) >= 4


def test_sigterm_during_nonfinite_steps_keeps_the_last_good_checkpoint(tmp_path, char_data):
    """SIGTERM while every step is non-finite (an absurd learning rate on a resumed run): the diverged
    weights are not saved over the last good checkpoint, and the last line says which one stays."""
    out_dir = tmp_path / "out"
    argv = [*TINY_LOCAL_RUN, f"--data_dir={char_data}", f"--out_dir={out_dir}"]
    assert launch.main(argv) == 0  # a good checkpoint at iter 4
    good = (out_dir / "ckpt.pt").read_bytes()
    diverge = ["--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000", "--log_interval=1",
               "--learning_rate=1e30", "--min_lr=1e29", "--grad_clip=0", "--max_nonfinite_steps=0"]  # fmt: skip
    launcher = start_local_launcher([*argv, *diverge], tmp_path)
    out, err = sigterm_once(launcher, to_group=True, after=lambda line: "step(s) skipped for a non-finite" in line)
    assert launcher.returncode == EXIT_TERMINATED, out + err
    unsaved = r"no checkpoint at iter \d+: its last \d+ step\(s\) were not finite, and diverged weights are never saved"
    [stopped] = lines_matching(rf"^SIGTERM: ({unsaved}); the last good checkpoint stays$", out)
    assert err.strip().splitlines()[-1] == (
        f"terminated: {stopped.group(1)}; the latest checkpoint is {out_dir / 'ckpt.pt'}: run the same command "
        "again to continue from it"
    )
    assert (out_dir / "ckpt.pt").read_bytes() == good


# ---- Ray tier: a real preemption on a loopback cluster --------------------------------------------

PREEMPT_RUN = {
    **TINY_RUN,
    "max_iters": 300,  # the notice comes a few seconds (~100 steps) after the drain
    "lr_decay_iters": 300,
    "eval_interval": 1000,  # the only evals are iteration 0's and the last: the notice checkpoint needs none
    "log_interval": 1,
    "num_workers": 2,
    "cpus_per_worker": 1,
    "always_save_checkpoint": False,
    "max_failures": 0,  # a preemption restarts on its own budget (max_preemption_failures)
}
DEADLINE_S = 10


@pytest.fixture(scope="module")
def preemptible_cluster():
    """Our own cluster (a preemption leaves a node draining): a head with no CPUs, two 2-CPU nodes; the
    run's two 1-CPU workers are packed onto one node, and the other can take them after the preemption."""
    from multinode import start_cluster

    cluster = start_cluster({"head": 0, "node-1": 2, "node-2": 2})
    yield cluster
    cluster.stop()


def node_running_the_workers(cluster, started_after: float):
    """The cluster node whose `ray start` process this run's Ray Train workers descend from."""
    for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
        if any("RayTrainWorker" in part for part in p.info["cmdline"] or ()) and p.info["create_time"] > started_after:
            ancestors = {parent.pid for parent in p.parents()}
            for node in cluster.nodes.values():
                if node.process.pid in ancestors:
                    return node
    return None


def node_id(node) -> str:
    """The node's id, from its raylet's log."""
    log = (node.root / "ray" / "session_latest" / "logs" / "raylet.out").read_text(errors="replace")
    return re.search(r"[Nn]ode[ _]?[Ii][Dd][:=]? ?([0-9a-f]{56})", log).group(1)


@pytest.mark.ray
def test_a_drained_node_costs_no_step(preemptible_cluster, tmp_path, char_data):
    cluster = preemptible_cluster
    argv = [f"--{key}={value}" for key, value in PREEMPT_RUN.items()]
    argv += [f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}", f"--storage_path={tmp_path / 'ray'}"]
    # The controller looks for drained nodes every 0.2 s (Ray's default: 5 s); the workers poll every iteration.
    env = cluster.driver_env(PYTHONPATH=CODE, RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.2")
    started = time.time()
    launcher = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *argv], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out = []
    try:
        for line in launcher.stdout:
            out.append(line)
            if line.startswith("iter 2:"):
                break
        target = node_running_the_workers(cluster, started)
        assert target is not None and target.name != "head", "".join(out)
        subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "drain-node", f"--address={cluster.address}",
             f"--node-id={node_id(target)}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
             "--reason-message=test: spot reclaim", f"--deadline-remaining-seconds={DEADLINE_S}"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        rest, _ = launcher.communicate(timeout=240)
        out.append(rest)
    finally:
        launcher.kill()
    out = "".join(out)
    assert launcher.returncode == 0, out
    assert "preemption notice" in out, out
    [noticed] = lines_matching(r"^preemption notice at iter (\d+): ranks \[0, 1\] lose their node in ([\d.]+)s", out)
    [saved] = lines_matching(r"^preemption: checkpoint at iter (\d+) saved ([\d.]+)s after the notice, "
                             r"([\d.]+)s before the deadline", out)  # fmt: skip
    [resumed] = lines_matching(r"^resuming from .* at iter (\d+)", out)
    notice_iter = int(noticed.group(1))
    assert int(saved.group(1)) == notice_iter == int(resumed.group(1))  # resumed from the notice's checkpoint
    assert float(saved.group(3)) > 0  # saved before the deadline
    # Nothing trained after the notice is lost: the last step logged before it is the one before it.
    before_restart = out[: out.index(resumed.group(0))]
    assert max(int(m.group(1)) for m in lines_matching(r"^iter (\d+):", before_restart)) == notice_iter - 1
    assert lines_matching(rf"^iter {PREEMPT_RUN['max_iters'] - 1}:", out)  # and the run finished
    print(f"preemption noticed at iter {notice_iter} with {noticed.group(2)}s of {DEADLINE_S}s left; "
          f"checkpoint saved {saved.group(2)}s after the notice")  # fmt: skip


@pytest.mark.ray
def test_sigterm_to_the_launcher_of_a_ray_run_checkpoints_then_ends_it(ray_local, tmp_path, char_data):
    """A scheduler's SIGTERM to the driver: both workers checkpoint at their next poll (log_interval), the run
    ends, and the launcher exits 143 naming what to rerun; nothing was trained after the checkpoint."""
    out_dir = tmp_path / "out"
    values = {**PREEMPT_RUN, "max_iters": 100000, "lr_decay_iters": 100000}
    argv = [f"--{key}={value}" for key, value in values.items()]
    argv += [f"--data_dir={char_data}", f"--out_dir={out_dir}", f"--storage_path={tmp_path / 'ray'}"]
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONPATH": CODE, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *argv], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out = []
    try:
        for line in launcher.stdout:
            out.append(line)
            if line.startswith("iter 3:"):
                break
        launcher.send_signal(signal.SIGTERM)
        rest, err = launcher.communicate(timeout=120)
        out.append(rest)
    finally:
        launcher.kill()
    out = "".join(out)
    assert launcher.returncode == EXIT_TERMINATED, out + err
    assert "terminating: the workers save a checkpoint and end the run" in err
    [asked] = lines_matching(r"^SIGTERM to the launcher at iter (\d+): saving a checkpoint", out)
    [saved] = lines_matching(r"^SIGTERM to the launcher: checkpoint at iter (\d+) saved", out)
    stop_iter = int(asked.group(1))
    assert int(saved.group(1)) == stop_iter
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated: the latest checkpoint is "), err
    assert last.endswith("run the same command again to continue from it"), last
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == stop_iter
    assert max(int(m.group(1)) for m in lines_matching(r"^iter (\d+):", out)) == stop_iter - 1


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def sigterm_group_of_own_ray_launch(argv: list[str], cwd: Path, after: Callable[[str], bool]):
    """`python -m raygpt.launch` starting a Ray of its own, in a process group (and session) of its own, as a
    batch job runs it; SIGTERM to that whole group once a line of its output passes `after`. Returns the
    launcher's exit status, its stdout and stderr, and the Ray processes it started that outlived it."""
    # A Ray of the launcher's own (not one another test started with `ray start`), with a short temp path:
    # Ray's socket paths must stay under the OS's 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(PYTHONPATH=CODE, PYTHONUNBUFFERED="1", RAY_TMPDIR=str(ray_tmp))
    launcher = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *argv], env=env, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
    out, started, left, err = [], [], [], ""
    try:
        for line in launcher.stdout:
            out.append(line)
            if after(line):
                break
        started = descendants(launcher.pid)  # the Ray the launcher started: GCS, raylet, the workers...
        assert any(p.name() == "raylet" for p in started), "".join(out)
        os.killpg(launcher.pid, signal.SIGTERM)  # start_new_session: the group's id is the launcher's pid
        rest, err = launcher.communicate(timeout=150)
        out.append(rest)
        _, left = psutil.wait_procs(started, timeout=30)
    finally:
        launcher.kill()
        for process in started:  # by pid, only what this launcher started
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return launcher.returncode, "".join(out), err, left


@pytest.mark.ray
def test_sigterm_to_the_launchers_process_group_checkpoints_then_ends_the_run(tmp_path, char_data):
    """What `timeout`, `kill -- -PGID`, a closing terminal and batch schedulers send: SIGTERM to the launcher's
    whole process group. The Ray the launcher started is not in that group, so it lives on for the workers
    to checkpoint; the launcher exits as for its own SIGTERM, without a traceback, and Ray's processes end
    with it. The same command run again continues from that checkpoint."""
    out_dir = tmp_path / "out"
    values = {**PREEMPT_RUN, "num_workers": 1, "max_iters": 100000, "lr_decay_iters": 100000}
    argv = [f"--{key}={value}" for key, value in values.items()]
    argv += [f"--data_dir={char_data}", f"--out_dir={out_dir}", f"--storage_path={tmp_path / 'ray'}"]
    code, out, err, left = sigterm_group_of_own_ray_launch(argv, tmp_path, lambda line: line.startswith("iter 3:"))
    assert code == EXIT_TERMINATED, out + err
    [asked] = lines_matching(r"^SIGTERM to the launcher at iter (\d+): saving a checkpoint", out)
    [saved] = lines_matching(r"^SIGTERM to the launcher: checkpoint at iter (\d+) saved", out)
    stop_iter = int(asked.group(1))
    assert int(saved.group(1)) == stop_iter
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated: the latest checkpoint is "), err
    assert last.endswith("run the same command again to continue from it"), last
    assert "Traceback" not in out + err, out + err
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == stop_iter
    assert not left, f"Ray processes the launcher started are still running: {[p.pid for p in left]}"

    # The same command again, as the last line says: it continues from that checkpoint (then is stopped the same way).
    code, out, err, left = sigterm_group_of_own_ray_launch(argv, tmp_path, lambda line: line.startswith("resuming "))
    assert code == EXIT_TERMINATED, out + err
    [continuing] = lines_matching(r"^raygpt: continuing run 'out' .*from iter (\d+)", out)
    [resumed] = lines_matching(r"^resuming from .* at iter (\d+)", out)
    assert int(continuing.group(1)) == int(resumed.group(1)) == stop_iter > 0
    assert "Traceback" not in out + err, out + err
    assert not left, f"Ray processes the launcher started are still running: {[p.pid for p in left]}"


@pytest.mark.ray
def test_sigterm_to_a_ray_run_during_nonfinite_steps_keeps_the_last_good_checkpoint(ray_local, tmp_path, char_data):
    """The launcher's SIGTERM reaches the workers during a streak of non-finite steps: they save nothing, and the
    launcher's last line (told through Ray's key-value store) says so and names the checkpoint that stays."""
    out_dir = tmp_path / "out"
    values = {**PREEMPT_RUN, "num_workers": 1, "max_iters": 10, "eval_interval": 5}
    argv = [f"--{key}={value}" for key, value in values.items()]
    argv += [f"--data_dir={char_data}", f"--out_dir={out_dir}", f"--storage_path={tmp_path / 'ray'}"]
    assert launch.main(argv) == 0  # good checkpoints at iters 5 and 10
    good = (out_dir / "ckpt.pt").read_bytes()
    ray_checkpoints = sorted(p for p in (tmp_path / "ray").glob("*/checkpoint_*") if p.is_dir())
    diverge = ["--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000", "--learning_rate=1e30",
               "--min_lr=1e29", "--grad_clip=0", "--max_nonfinite_steps=0"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_local, "PYTHONPATH": CODE, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *argv, *diverge], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = sigterm_once(launcher, to_group=False, after=lambda line: "step(s) skipped for a non-finite" in line)
    assert launcher.returncode == EXIT_TERMINATED, out + err
    unsaved = r"no checkpoint at iter \d+: its last \d+ step\(s\) were not finite, and diverged weights are never saved"
    [stopped] = lines_matching(rf"^SIGTERM to the launcher: ({unsaved}); the last good checkpoint stays$", out)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"terminated: {stopped.group(1)}; the latest checkpoint is {ray_checkpoints[-1]}"), err
    assert (out_dir / "ckpt.pt").read_bytes() == good
    assert sorted(p for p in (tmp_path / "ray").glob("*/checkpoint_*") if p.is_dir()) == ray_checkpoints
