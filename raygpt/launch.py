"""`python -m raygpt.launch [CONFIG_FILE] [--num-workers N] [--key=value ...]`: config -> TorchTrainer.fit().

The CLI and `run()`: the checks before Ray starts, Ray, the plan (raygpt.driver), then the trainer's
fit() and its summary, each failure one line with its exit status.
"""

from __future__ import annotations

import logging
import signal
import sys

from raygpt.config.cli import config_help, read_config
from raygpt.config.schema import TrainConfig
from raygpt.driver.launcher import LauncherOptions, add_launcher_options, prepare_run
from raygpt.driver.plan import NothingToDo, count, workers_text
from raygpt.driver.preflight import absolute_paths, fresh_out_dir
from raygpt.driver.trainer import (
    RunFailed,
    RunInterrupted,
    build_trainer,
    in_main_thread,
    root_cause,
    summarize,
    where_to_continue,
    worker_refusal,
)
from raygpt.errors import EXIT_INTERRUPTED, EXIT_REFUSED, OneLineParser, RaygptError, refuse
from raygpt.ray_compat import forward_worker_output
from raygpt.worker.preemption import EXIT_TERMINATED, Terminated, handle_sigterm, why_not_saved


def run(cfg: TrainConfig, explicit_keys=(), options: LauncherOptions = LauncherOptions()):
    """Train `cfg` on Ray and return the ray.train.Result."""
    cfg, plan, lock = prepare_run(cfg, explicit_keys, options)
    if cfg.local_mode:
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # it logs every report at INFO
        print(
            f"raygpt: run '{plan.run_name}' in this process (Ray Train local mode) on "
            f"{'a GPU' if plan.use_gpu else count(plan.cpus_per_worker, 'CPU')}",
            flush=True,
        )
    else:
        print(
            f"raygpt: run '{plan.run_name}' with {workers_text(plan)}, {count(plan.cpus_per_worker, 'CPU')} each",
            flush=True,
        )
    forward_worker_output(True)
    # The trainer's handlers (interruptible) end with the run: a later run or a notebook gets its own back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread() else {}
    # Local mode trains in this process: SIGTERM checkpoints at the next iteration boundary, then stops.
    restore_sigterm = handle_sigterm() if cfg.local_mode and in_main_thread() else lambda: None
    try:
        trainer = build_trainer(cfg, plan)
        result = trainer.fit()
        if getattr(trainer, "stopped_by_sigterm", False):  # the workers checkpointed and ended the run
            forward_worker_output(False)
            raise RunInterrupted(where_to_continue(cfg, plan, why_not_saved(plan.launch_id)), terminated=True)
    except KeyboardInterrupt as e:
        forward_worker_output(False)  # the workers' last lines would come after the launcher's last line
        stopped = where_to_continue(cfg, plan, getattr(e, "not_saved", ""))
        raise RunInterrupted(stopped, terminated=isinstance(e, Terminated)) from None
    except (RaygptError, RunInterrupted):
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user; Ray's log (or local mode's raise) keeps the rest
        from ray.exceptions import RayError
        from ray.train import TrainingFailedError

        # Ray's own errors too: a joined cluster's node going away under the controller, say.
        if not (isinstance(e, (TrainingFailedError, RayError)) or cfg.local_mode):
            raise
        refusal = worker_refusal(e)
        if refusal is not None:  # bad input only a worker could see (its GPU's memory): a refusal all the same
            raise refusal from None
        forward_worker_output(False)
        raise RunFailed(f"training failed: {root_cause(e)}; {where_to_continue(cfg, plan)}") from e
    finally:
        restore_sigterm()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        lock.release()  # the run has ended: the next one (of this process, or another) may take it
    summarize(result, cfg)
    return result


def parse_args(argv: list[str]):
    parser = OneLineParser(
        prog="python -m raygpt.launch",
        hint="--help lists the options and every config key",
        allow_abbrev=False,  # --f would be --fresh, --add=... --address: config keys are never abbreviated
        usage="%(prog)s [CONFIG_FILE] [--num-workers N] [--key=value ...] [launcher options]",
        add_help=False,
        description="Train a GPT with Ray Train. CONFIG_FILE is a nanoGPT-format config (key = value lines); "
        "any config key can also be given as --key=value. Rerunning a command continues its run.",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every config key")
    add_launcher_options(parser)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run beside an earlier one of this out_dir (<out_dir>-2, ...); nothing is deleted",
    )
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own log lines, with their prefixes")
    return parser, *parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        parser, args, config_argv = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # the parser printed its one line
        return EXIT_REFUSED if e.code else 0
    if args.help:
        print(parser.format_help())
        print(config_help())
        return 0
    try:
        cfg, explicit_keys = read_config(config_argv)
        if args.fresh:
            cfg = fresh_out_dir(absolute_paths(cfg))
        options = LauncherOptions(args.address, args.wait_for_resources, args.prepare_input, args.verbose)
        run(cfg, explicit_keys, options)
    except NothingToDo as e:  # a finished run, rerun: what it would take to train further, and no error
        print(f"raygpt: {e}", flush=True)
        return 0
    except RaygptError as e:
        return refuse(e)
    except RunInterrupted as e:
        print(f"{'terminated' if e.terminated else 'interrupted'}: {e}", file=sys.stderr)
        return EXIT_TERMINATED if e.terminated else EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def program() -> None:
    """`python -m raygpt.launch` and `raygpt-launch`: main(), then a fast exit (see exit_without_teardown)."""
    code = main()
    from raygpt.processes import exit_without_teardown

    exit_without_teardown(code)


if __name__ == "__main__":
    program()
