"""The run plan: what the launcher decided for a run (workers, resources, its name, where it resumes),
handed to every worker as a dict and rebuilt there as a RunPlan."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunPlan:
    """What the launcher decided for a run, kept apart from what the user asked (the TrainConfig)."""

    num_workers: int  # the least, for an elastic run
    use_gpu: bool
    cpus_per_worker: float
    run_name: str
    resume_from: str | None = None  # out_dir/ckpt.pt to continue from when Ray holds no checkpoint of the run
    # time.time() when the launcher started and when Ray was ready: the start-up line the loop prints
    launched_at: float = 0.0
    ray_ready_at: float = 0.0
    max_workers: int = 0  # an elastic run grows up to this many; 0: a fixed count
    launch_id: str = ""  # new at each launch: a worker group tells Ray's restart of it from its first start
