"""What Tune runs for a sweep (raygpt.tune): each trial's training, in the trial's own process or as a Ray
Train run of its own, with its lines tagged; and Tune's Tuner, for a new sweep or an unfinished one."""

from __future__ import annotations

import dataclasses
import time

from raygpt.config.schema import TrainConfig, score_order
from raygpt.driver.plan import RunPlan
from raygpt.driver.sweep_console import TaggedLoop, tagged_output, trial_tag
from raygpt.driver.sweep_state import Sweep
from raygpt.driver.trainer import build_trainer


def trains_in_trial(cfg: TrainConfig, plan: RunPlan) -> bool:
    """Whether each trial trains in its own process instead of starting a Ray Train run: one fixed worker,
    no process group needed (FSDP2 shards over one; local mode keeps its Train semantics)."""
    return plan.num_workers == 1 and not plan.max_workers and cfg.parallelism != "fsdp" and not cfg.local_mode


def make_trainable(base: TrainConfig, plan: RunPlan):
    from ray import tune

    in_trial = trains_in_trial(base, plan)

    def train_trial(config: dict) -> None:
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        cfg = base.replace(**config, out_dir=f"{base.out_dir}/{trial_id}")
        started = time.time()  # a trial's start-up line counts from the trial's own start, not the sweep's
        trial_plan = dataclasses.replace(plan, run_name=f"{plan.run_name}-{trial_id}", launched_at=started,
                                         ray_ready_at=started, launch_id=f"{plan.launch_id}-{trial_id}")  # fmt: skip
        with tagged_output(trial_tag(trial_id)):
            if in_trial:
                from raygpt.worker.loop import train_in_tune_trial

                train_in_tune_trial({"config": cfg.to_dict(), "plan": dataclasses.asdict(trial_plan)})
            else:
                from ray.tune.integration.ray_train import TuneReportCallback

                trainer = build_trainer(cfg, trial_plan, callbacks=[TuneReportCallback()],
                                        train_loop=TaggedLoop(trial_tag(trial_id)))  # fmt: skip
                trainer.fit()

    if not in_trial:
        # The trial function only drives the Train run (whose controller takes 0 CPUs); its workers hold the
        # resources. Tune refuses an all-zero request, and a CPU fraction would leave the workers' planned
        # CPUs short of the cluster's, so the trial asks for one byte of Ray's memory resource.
        return tune.with_resources(train_trial, {"memory": 1})
    return tune.with_resources(train_trial, {"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})})


def build_tuner(cfg: TrainConfig, plan: RunPlan, sweep: Sweep, space: dict, names: list[str], num_samples: int,
                concurrent: int, asha: bool, grace_period: int | None, verbose: int):  # fmt: skip
    """Tune's Tuner for a new sweep, or for the unfinished one at sweep.path (its trials continue from their
    last checkpoints, failed ones too)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from raygpt.driver.sweep_report import TrialLines

    trainable = make_trainable(cfg, plan)
    if sweep.state == "resume":
        return tune.Tuner.restore(sweep.path, trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if asha:
        grace = grace_period or min(cfg.max_iters, 2 * cfg.eval_interval)
        scheduler = ASHAScheduler(time_attr="iter", max_t=max(cfg.max_iters, 1), grace_period=max(1, grace))
    in_trial = trains_in_trial(cfg, plan)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            num_samples=num_samples,
            max_concurrent_trials=concurrent,
            scheduler=scheduler,
            # A finished trial's process runs the next trial: torch imported, its GPU set up and its graphs
            # compiled. Only where the trial trained itself: a Train run that a scheduler stopped goes on in
            # the trial's thread, Tune cannot hand that process on, and the sweep waited forever.
            reuse_actors=in_trial,
            trial_dirname_creator=trial_folder_name,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=cfg.storage_path or None,
            verbose=verbose,
            callbacks=[TrialLines(names, sweep.trials_dir, cfg.max_iters)] if not verbose else None,
            # A trial that trains in its own process is restarted and checkpointed by Tune, as a Train run
            # would be by Train.
            **(trial_run_options(cfg) if in_trial else {}),
        ),
    )


def trial_folder_name(trial) -> str:
    """A trial's folder in the experiment folder: its id, as its out_dir is named."""
    return trial.trial_id


def trial_run_options(cfg: TrainConfig) -> dict:
    from ray import tune

    return dict(
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        # The loop scores its evals into the checkpoint's report here (no Ray validation in a trial), so
        # checkpoint_score ranks what Tune keeps, as it does for Train.
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=cfg.checkpoints_to_keep,
            checkpoint_score_attribute=cfg.checkpoint_score,
            checkpoint_score_order=score_order(cfg.checkpoint_score),
        ),
    )
