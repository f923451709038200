"""Elastic training on the loopback cluster: a `--num-workers 1-2` run loses a node and goes on with one
worker from its latest checkpoint, grows back to two workers when a new node joins, and ends at
max_iters.

How Ray Train V2 (ray 2.60) resizes: after a failure it restarts with as many workers (1-2) as fit in
the view of the cluster that Ray's AutoscalingCoordinator actor keeps, and a group that Ray cannot place
gives up after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S and is tried again; while a group is healthy, Ray
looks for room to grow every `elastic_resize_interval_s` (ScalingConfig(elastic_resize_monitor_interval_s)).
The coordinator refreshes its view every 20 s (a constant in ray 2.60): after the node dies and after
the new one joins, the test has it refresh at once (the same refresh, through the coordinator's own
call), rather than wait up to 20 s each time.
"""

import math
import re
import subprocess
import sys
import threading
import time

import pytest
from test_faults import FAULT_RUN, cli_args
from test_multinode import newest_state, registered_checkpoints

pytestmark = pytest.mark.ray

# One CPU a node and one a worker: two nodes take two workers, one node one.
ELASTIC_RUN = {
    **FAULT_RUN,  # gradient_accumulation_steps=2: one worker or two split it evenly
    "num_workers": "1-2",
    "max_iters": 300,  # Ray grows the run back at about iter 60, within ~15 s more at worst
    "lr_decay_iters": 300,
    "eval_interval": 10,  # a checkpoint every 10 iterations
    "eval_iters": 2,
    "log_interval": 10,
    "max_failures": 1,  # the lost node; growing is no failure
    "elastic_resize_interval_s": 5,  # the one-worker group trains this long before Ray grows it
}
# A group Ray starts with more workers than the cluster holds now (its view still has the dead node)
# gives up after this long, and Ray starts one with fewer (Ray's default: 60 s).
WORKER_GROUP_START_TIMEOUT_S = "5"
RESUMED = r"resuming from (\S+) at iter (\d+) .* with (\d+) workers?"

# Answers the test's questions about the cluster, one a line on stdin, "done" on stdout once so:
#   nodes N   N live nodes have CPUs, and Ray's AutoscalingCoordinator has refreshed its view of them
#   placed N  Ray has placed a group of N workers (a placement group of N bundles)
WATCHER = """
import sys, time
import ray

ray.init(logging_level="ERROR", log_to_driver=False)


def nodes_with_cpus():
    return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU"))


def placed_groups():
    return [len(group["bundles"]) for group in ray.util.placement_group_table().values()
            if group["state"] == "CREATED"]


for line in sys.stdin:
    question, count = line.split()
    if question == "nodes":
        while nodes_with_cpus() != int(count):
            time.sleep(0.1)
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.get_reserved_resources.remote("raygpt-test", recompute=True))
    else:
        while int(count) not in placed_groups():
            time.sleep(0.1)
    print("done", flush=True)
"""


class ClusterWatcher:
    """A second driver on the cluster that waits for what the test asks (WATCHER)."""

    def __init__(self, cluster):
        self.process = subprocess.Popen([sys.executable, "-c", WATCHER], env=cluster.driver_env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip

    def refresh_view(self, nodes_with_cpus: int) -> None:
        """Once the cluster has this many nodes with CPUs, Ray's view of it is up to date."""
        self._ask(f"nodes {nodes_with_cpus}")

    def wait_until_placed(self, workers: int) -> None:
        """Until Ray has placed a worker group of this size: it has decided on that size."""
        self._ask(f"placed {workers}")

    def _ask(self, question: str, timeout: float = 60) -> None:
        self.process.stdin.write(f"{question}\n")
        self.process.stdin.flush()
        answered = threading.Event()

        def read_answer():  # Ray prints notices (a node marked dead) on the same stdout
            for line in self.process.stdout:
                if line == "done\n":
                    answered.set()
                    return

        threading.Thread(target=read_answer, daemon=True).start()
        assert answered.wait(timeout), f"'{question}' did not come true in {timeout}s"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class RunOutput:
    """The launcher's output, read by a thread so that its pipe never fills while the test works on the
    cluster."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.arrived = threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.reader.start()

    def _read(self, process) -> None:
        for line in process.stdout:
            with self.arrived:
                self.lines.append(line)
                self.arrived.notify_all()
        with self.arrived:
            self.arrived.notify_all()  # the end: nothing more will match

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        deadline, seen = time.time() + timeout, 0
        with self.arrived:
            while not any(re.search(pattern, line) for line in self.lines[seen:]):
                seen = len(self.lines)
                if not self.reader.is_alive() or not self.arrived.wait(max(0.0, deadline - time.time())):
                    pytest.fail(f"never saw {pattern!r}:\n{self.text()[-3000:]}")

    def text(self) -> str:
        with self.arrived:
            return "".join(self.lines)


def wait_until_registered(storage: str, run_name: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not registered_checkpoints(storage, run_name):
        if time.time() > deadline:
            pytest.fail("Ray never registered a checkpoint")
        time.sleep(0.2)


def test_a_lost_node_shrinks_the_run_and_a_new_node_grows_it(ray_nodes, tmp_path, char_data):
    storage, out_dir = str(tmp_path / "ray"), tmp_path / "out"
    values = {**ELASTIC_RUN, "data_dir": char_data, "storage_path": storage, "out_dir": out_dir}
    spare, victim = "node-3", "node-1"
    ray_nodes.nodes[spare].kill()  # the two nodes left take the run's two workers
    missing = {spare}  # nodes of the session's cluster to bring back at the end
    env = ray_nodes.driver_env(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=WORKER_GROUP_START_TIMEOUT_S)
    process = subprocess.Popen([sys.executable, "-m", "raygpt.launch", *cli_args(values)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out, watcher = RunOutput(process), ClusterWatcher(ray_nodes)
    try:
        out.wait_for(r"saved checkpoint")
        wait_until_registered(storage, "out")
        ray_nodes.nodes[victim].kill()
        missing.add(victim)
        watcher.refresh_view(nodes_with_cpus=1)
        watcher.wait_until_placed(workers=1)  # Ray goes on on the node left; only now may a node join
        ray_nodes.replace(victim)  # a new machine
        missing.discard(victim)
        watcher.refresh_view(nodes_with_cpus=2)
        watcher.wait_until_placed(workers=2)
        ray_nodes.replace(spare)  # while the run trains: at two workers, it takes no more
        missing.discard(spare)
        returncode = process.wait(timeout=240)
    finally:
        process.kill()
        watcher.stop()
        for name in sorted(missing):
            ray_nodes.replace(name)
    out.reader.join(timeout=30)
    output = out.text()
    assert returncode == 0, output[-3000:]
    # After the kill, one worker went on from a Ray checkpoint, then two from a later one.
    resumes = [(m.group(1), int(m.group(2)), int(m.group(3))) for m in re.finditer(RESUMED, output)]
    assert [workers for _, _, workers in resumes] == [1, 2], output[-3000:]
    (shrunk_from, shrunk_at, _), (grown_from, grown_at, _) = resumes
    assert "checkpoint_" in shrunk_from and "checkpoint_" in grown_from, output[-3000:]
    assert 0 < shrunk_at < grown_at < ELASTIC_RUN["max_iters"], output[-3000:]
    losses = [float(loss) for loss in re.findall(r"loss (\S+?)[,) ]", output)]
    assert losses and all(math.isfinite(loss) for loss in losses), output[-3000:]
    assert newest_state(storage, "out", tmp_path)["iter_num"] == ELASTIC_RUN["max_iters"]
    assert not ray_nodes.cross_node_reads([out_dir, ray_nodes.root])
