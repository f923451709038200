"""`python -m raygpt.tune [CONFIG_FILE] --key=SPEC ... [--num-samples N] [--max-concurrent K] [--asha]`: a sweep.

A SPEC is `loguniform:LOW:HIGH`, `uniform:LOW:HIGH`, `choice:A,B,C` or `grid:A,B,C`; every other
`--key=value` and the config file are read as by raygpt.launch. Each trial trains the base config with
the trial's values, its own run_name (`<run_name>-<trial_id>`) and out_dir (`<sweep>/<trial_id>` beside
out_dir, <sweep> being the sweep's name: --name, default `<run_name>-tune`; raygpt.driver.sweep_state). A rerun
of the command resumes an unfinished sweep and shows a finished one's results; --fresh starts a new one.
A trial of one worker trains in the trial's own process (raygpt.worker.loop.train_in_tune_trial), reporting
and checkpointing to Tune, which restarts it after a failure (max_failures); Tune reuses the process for
the next trial, which so starts with torch imported and its graphs compiled. A trial of several workers
(or FSDP2, or an elastic count) is a Ray Train V2 run (`raygpt.driver.trainer.build_trainer`) whose eval metrics
reach Tune through TuneReportCallback. Tune minimizes val_loss; --asha stops poor trials early
(time_attr 'iter'). Each trial's lines start with its trial id, and the result table comes last
(raygpt.driver.sweep_console).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass

from raygpt.config.cli import config_help, parse_value, read_config
from raygpt.config.schema import (
    FIELD_TYPES,
    NAME_MAX,
    NOT_SAMPLED,
    ConfigError,
    TrainConfig,
    check_known,
    check_name_lengths,
    is_plain_name,
    shown,
)
from raygpt.driver.identity import identify_run
from raygpt.driver.launcher import LauncherOptions, add_launcher_options, prepare_run
from raygpt.driver.plan import (
    RunPlan,
    check_workers,
    count,
    cpu_share,
    describe_worker,
    eval_task,
    nearest_multiples,
    plan_resources,
)
from raygpt.driver.preflight import absolute_paths
from raygpt.driver.sweep_console import OutputWatch, quiet_sweep_output
from raygpt.driver.sweep_state import (
    Sweep,
    find_sweep,
    finished_results,
    record_settings,
    sweep_settings,
    unfinished_trials,
)
from raygpt.driver.sweep_trials import build_tuner, trains_in_trial
from raygpt.errors import EXIT_INTERRUPTED, LaunchError, OneLineParser, RaygptError, refuse
from raygpt.storage.uri import check_storage_path

KINDS = ("loguniform", "uniform", "choice", "grid")
SPEC_RE = re.compile(rf"^({'|'.join(KINDS)}):(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Spec:
    kind: str
    values: tuple  # (low, high) for the ranges, the options for choice/grid

    def __str__(self) -> str:
        sep = ":" if self.kind in ("loguniform", "uniform") else ","
        return f"{self.kind}:{sep.join(repr(v) for v in self.values)}"


def is_spec(text: str) -> bool:
    return bool(SPEC_RE.match(text))


def check_sampled(name: str) -> None:
    """`name` is a config key a sweep may sample."""
    check_known(name)
    if name in NOT_SAMPLED:
        raise ConfigError(f"bad search space for {name}: every trial of a sweep shares {name}, it cannot be sampled")


def parse_spec(name: str, text: str) -> Spec:
    """`loguniform:1e-4:3e-3` -> Spec('loguniform', (1e-4, 3e-3)); one-line ConfigError when malformed."""
    check_sampled(name)
    match = SPEC_RE.match(text)
    if not match:
        raise ConfigError(
            f"bad search space for {name}: expected one of {', '.join(k + ':' for k in KINDS)}, got {text!r}"
        )
    kind, body = match.groups()
    typ = FIELD_TYPES[name]
    if kind in ("loguniform", "uniform"):
        parts = body.split(":")
        values = tuple(parse_value(p.strip()) for p in parts)
        if len(parts) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ConfigError(f"bad search space for {name}: {kind} needs two numbers LOW:HIGH, got {text!r}")
        if typ not in (int, float):
            raise ConfigError(f"bad search space for {name}: {kind} needs a numeric key, '{name}' is {typ.__name__}")
        low, high = values
        if not low < high:
            raise ConfigError(f"bad search space for {name}: {kind} needs LOW < HIGH, got {text!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"bad search space for {name}: loguniform needs LOW > 0, got {text!r}")
        if typ is int and not all(float(v).is_integer() for v in values):
            raise ConfigError(
                f"bad search space for {name}: '{name}' is an int key, {kind} bounds must be integers, got {text!r}"
            )
        return Spec(kind, (int(low), int(high)) if typ is int else (float(low), float(high)))
    parts = [p.strip() for p in body.split(",")]
    if not body.strip() or any(not p for p in parts):
        raise ConfigError(f"bad search space for {name}: {kind} needs comma-separated values A,B,..., got {text!r}")
    return Spec(kind, tuple(parse_value(p) for p in parts))


def split_argv(config_argv: list[str]) -> tuple[list[str], dict[str, Spec]]:
    """Separate sampled overrides (`--key=SPEC` / `--key SPEC`) from what load_config reads."""
    rest: list[str] = []
    specs: dict[str, Spec] = {}
    i = 0
    while i < len(config_argv):
        arg = config_argv[i]
        if arg.startswith("--"):
            name, has_value, text = arg[2:].partition("=")
            if not has_value and i + 1 < len(config_argv) and is_spec(config_argv[i + 1]):
                text, has_value = config_argv[i + 1], True
                i += 1
            if has_value and is_spec(text):
                name = name.replace("-", "_")
                if name in specs:
                    raise ConfigError(f"--{name} is sampled twice")
                specs[name] = parse_spec(name, text)
                i += 1
                continue
        rest.append(arg)
        i += 1
    fixed = {arg[2:].partition("=")[0].replace("-", "_") for arg in rest if arg.startswith("--")}
    both = sorted(fixed & specs.keys())
    if both:  # the sampled value would silently win
        raise ConfigError(f"--{both[0]} is both sampled ({specs[both[0]]}) and set: give it once")
    return rest, specs


def split_search_space(config_argv: list[str]) -> tuple[list[str], dict]:
    """Like split_argv, with the sampled keys already as Ray Tune's param_space."""
    rest, specs = split_argv(config_argv)
    return rest, search_space(specs)


def check_specs(base: TrainConfig, specs: dict[str, Spec]) -> dict[str, Spec]:
    """Each bound / option must make a valid config with the base; returns the specs with coerced values."""
    checked = {}
    for name, spec in specs.items():
        values = []
        for value in spec.values:
            try:
                values.append(getattr(base.replace(**{name: value}), name))
            except ConfigError as e:
                raise ConfigError(f"bad search space for {name} ({spec}): {e}") from None
        checked[name] = Spec(spec.kind, tuple(values))
    return checked


# Sampled keys the trials' worker count constrains (driver.plan.check_workers).
WORKER_KEYS = ("gradient_accumulation_steps", "data_order")


def check_sampled_for_workers(cfg: TrainConfig, specs: dict, num_workers: int) -> None:
    """Every value a sweep may sample of WORKER_KEYS must suit the trials' worker count, as launch requires
    of the one value it trains: a trial would otherwise train another configuration than it reports (a
    gradient_accumulation_steps of 3 on 2 workers trains 2 micro-batches)."""
    for name in WORKER_KEYS:
        spec = specs.get(name)
        for value in possible_values(spec) if spec is not None else ():
            advice = f"sample multiples of {num_workers}, e.g. --{name}={divisible_spec(spec, num_workers)}"
            try:
                check_workers(cfg.replace(**{name: value}), num_workers, advice)
            except LaunchError as e:
                raise ConfigError(f"bad search space for {name} ({spec_text(spec)}): {e}") from None


def possible_values(spec) -> list:
    """The values a Spec, or a ready param_space's grid_search or choice, may give; [] for a range of a
    ready param_space (a Tune domain sampled as given)."""
    if isinstance(spec, Spec) and spec.kind in ("uniform", "loguniform"):
        low, high = spec.values
        return list(range(low, high + 1)) if isinstance(low, int) else []
    if isinstance(spec, Spec):
        return list(spec.values)
    if isinstance(spec, dict) and "grid_search" in spec:
        return list(spec["grid_search"])
    return list(getattr(spec, "categories", []))


def divisible_spec(spec, num_workers: int) -> str:
    """`spec` with each integer value moved up to a multiple of num_workers (a range: its multiples, as a
    choice), in raygpt.tune's spelling."""
    values = [v for v in possible_values(spec) if isinstance(v, int)]
    if isinstance(spec, Spec) and spec.kind in ("uniform", "loguniform"):
        kind = "choice"
        multiples = [v for v in values if v % num_workers == 0] or nearest_multiples(values[0], num_workers)
    else:
        kind = spec.kind if isinstance(spec, Spec) else "grid" if isinstance(spec, dict) else "choice"
        multiples = [v if v % num_workers == 0 else nearest_multiples(v, num_workers)[-1] for v in values]
    return f"{kind}:{','.join(str(v) for v in dict.fromkeys(multiples))}"


def spec_text(spec) -> str:
    return str(spec) if isinstance(spec, Spec) else shown(spec)


def search_space(specs: dict[str, Spec]) -> dict:
    """Specs -> Ray Tune's param_space."""
    from ray import tune

    space = {}
    for name, spec in specs.items():
        is_int = FIELD_TYPES[name] is int
        if spec.kind == "loguniform":
            space[name] = (
                tune.lograndint(spec.values[0], spec.values[1] + 1) if is_int else tune.loguniform(*spec.values)
            )
        elif spec.kind == "uniform":
            space[name] = tune.randint(spec.values[0], spec.values[1] + 1) if is_int else tune.uniform(*spec.values)
        elif spec.kind == "choice":
            space[name] = tune.choice(list(spec.values))
        else:
            space[name] = tune.grid_search(list(spec.values))
    return space


def trial_count(space: dict, num_samples: int) -> int:
    grid = math.prod(len(v["grid_search"]) for v in space.values() if isinstance(v, dict) and "grid_search" in v)
    return num_samples * grid


def trial_eval_task(cfg: TrainConfig, plan: RunPlan) -> tuple[float, float]:
    """The CPUs and GPUs each trial's evals take beside its workers: a trial that is a Train run scores its
    checkpoints in a Ray task of their own; one that trains in its trial's process scores them in the loop."""
    return (0.0, 0.0) if trains_in_trial(cfg, plan) else eval_task(cfg)


def trials_that_fit(cfg: TrainConfig, plan: RunPlan, explicit_keys) -> int:
    """Trials whose Train workers (and eval tasks) fit side by side now (workers shrink to that share where
    not set explicitly)."""
    import ray

    resources = ray.cluster_resources()
    eval_cpus, eval_gpus = trial_eval_task(cfg, plan)
    if plan.use_gpu:
        workers = plan.num_workers if "num_workers" in explicit_keys else 1
        return int(resources.get("GPU", 0) // (workers + eval_gpus))
    per_worker = plan.cpus_per_worker if "cpus_per_worker" in explicit_keys else 1.0
    return int(resources.get("CPU", 0) // (plan.num_workers * per_worker + eval_cpus))


def plan_concurrency(cfg: TrainConfig, plan: RunPlan, explicit_keys, concurrent: int) -> RunPlan:
    """Share the cluster between `concurrent` trials where the user left workers/CPUs to the planner."""
    import ray

    resources = ray.cluster_resources()
    eval_cpus, eval_gpus = trial_eval_task(cfg, plan)  # each trial's eval task is left its share first
    cpus, gpus = resources.get("CPU", 0.0) - concurrent * eval_cpus, resources.get("GPU", 0) - concurrent * eval_gpus
    changes = {}
    if plan.use_gpu and "num_workers" not in explicit_keys:
        changes["num_workers"] = max(1, int(gpus) // concurrent)
    workers = changes.get("num_workers", plan.num_workers)
    if "cpus_per_worker" not in explicit_keys:
        changes["cpus_per_worker"] = cpu_share(cpus, workers * concurrent, plan.use_gpu)
    if not changes:
        return plan
    return plan_resources(cfg.replace(use_gpu=plan.use_gpu, **changes))


def run_sweep(
    base: TrainConfig,
    specs: dict[str, Spec],
    explicit_keys=(),
    num_samples: int = 1,
    max_concurrent: int | None = None,
    asha: bool = False,
    grace_period: int | None = None,
    options: LauncherOptions = LauncherOptions(),
    name: str | None = None,
    verbose: int = 0,
    fresh: bool = False,
):
    """Run the sweep, or resume it, and return Tune's ResultGrid (a finished sweep's, read back).
    `specs`: {key: Spec} from split_argv, or a Tune param_space. `verbose`: Tune's own output (0: none,
    raygpt's lines instead).

    Trials run `concurrent` at a time: --max-concurrent, capped (unless wait_for_resources) by how many the
    cluster holds side by side; a trial's own request is negligible, so this cap is what keeps Tune from
    starting trials whose Train workers would only wait for resources."""
    quiet_sweep_output(verbose)
    check_sweep_options(base, specs, num_samples, max_concurrent, asha, grace_period, name)
    # Specs (from split_argv) are checked against the base config; a ready param_space is used as given.
    space = search_space(check_specs(base, specs)) if all(isinstance(s, Spec) for s in specs.values()) else specs
    explicit_keys = set(explicit_keys) | set(specs)
    if base.num_workers and not base.local_mode:  # a count given: checked now, not after Ray has started
        check_sampled_for_workers(base, specs, base.num_workers)
    trials = trial_count(space, num_samples)
    settings = command_settings(base, specs, num_samples, asha, grace_period)
    sweep, base = locate_sweep(base, name, settings, trials, fresh)
    print(f"raygpt.tune: {sweep.line}", flush=True)
    if sweep.state == "finished":
        return finished_results(sweep)
    cfg, plan, lock = prepare_run(base, explicit_keys, options, new_runs=True)  # each trial is a run of its own
    try:  # the run lock is released when the sweep ends, or fails to start
        cfg = cfg.replace(out_dir=sweep.trials_dir)
        check_trial_names(plan.run_name)
        concurrent = min(max_concurrent or trials, trials)
        if not options.wait_for_resources:
            concurrent = max(1, min(concurrent, trials_that_fit(cfg, plan, explicit_keys)))
        if concurrent > 1:
            plan = plan_concurrency(cfg, plan, explicit_keys, concurrent)
        check_sampled_for_workers(cfg, specs, plan.num_workers)
        workers = count(plan.num_workers, describe_worker(plan))
        in_trial = trains_in_trial(cfg, plan)
        print(
            f"raygpt.tune: {count(trials, 'trial')} of {workers},"
            f" {count(plan.cpus_per_worker, 'CPU')} each, up to {concurrent} at a time"
            + (", each training in its Tune trial's process" if in_trial else ", each a Ray Train run")
            + f"; their out_dirs in {sweep.trials_dir}",
            flush=True,
        )
        tuner = build_tuner(cfg, plan, sweep, space, list(specs), num_samples, concurrent, asha, grace_period, verbose)
        if sweep.state == "new":
            record_settings(sweep, settings)
        return tuner.fit()
    finally:
        lock.release()


def command_settings(base: TrainConfig, specs: dict, num_samples: int, asha: bool, grace_period: int | None):
    """What the sweep's command asks for (sweep_state.sweep_settings); None for a ready param_space."""
    if not all(isinstance(spec, Spec) for spec in specs.values()):
        return None
    options = {"num-samples": num_samples, "asha": asha, "grace-period": grace_period}
    return sweep_settings(absolute_paths(base), {key: str(spec) for key, spec in specs.items()}, options)


def locate_sweep(base: TrainConfig, name: str | None, settings: dict | None, trials: int,
                 fresh: bool) -> tuple[Sweep, TrainConfig]:  # fmt: skip
    """The sweep this command runs (sweep_state.find_sweep), and the base config to prepare it from: its
    run name fixed, its out_dir the trials' folder (with init_from=resume, out_dir's: every trial starts
    from that run)."""
    cfg = absolute_paths(base)
    run_name = identify_run(cfg, new_runs=True).run_name
    sweep = find_sweep(cfg, name or f"{run_name}-tune", settings, trials, fresh)
    cfg = cfg.replace(run_name=run_name)
    return sweep, cfg if cfg.init_from == "resume" else cfg.replace(out_dir=sweep.trials_dir)


def check_sweep_options(base: TrainConfig, specs: dict, num_samples: int, max_concurrent: int | None, asha: bool,
                        grace_period: int | None, name: str | None) -> None:  # fmt: skip
    """What a sweep needs (something to sample, only keys that may be sampled, a trial or more), and what
    Ray would refuse (or quietly ignore) only after it started: ASHA's grace period, the experiment's
    folder name, and where its results go."""
    if not specs:
        raise ConfigError(
            "nothing to tune: give at least one --key=SPEC (loguniform:LOW:HIGH, uniform:LOW:HIGH, "
            "choice:A,B or grid:A,B)"
        )
    if num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {num_samples}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    if base.eval_only:
        raise ConfigError("eval_only=True has nothing to tune")
    if grace_period is not None and not asha:
        raise ConfigError("--grace-period is ASHA's: add --asha, or leave it out")
    if grace_period is not None and not 1 <= grace_period <= base.max_iters:
        raise ConfigError(
            f"--grace-period must be from 1 to max_iters ({base.max_iters}): ASHA may stop a trial only after it, "
            f"got {grace_period}"
        )
    if name is not None and not is_plain_name(name):
        raise ConfigError(f"--name {name!r} must be a plain folder name (no '/', not '.' or '..')")
    if name is not None:
        check_name_lengths("--name", name)
    check_storage_path(base.storage_path)
    for key in specs:  # also the keys of a ready param_space
        check_sampled(key)


# What a trial adds to the sweep's run name for its own Ray run: '-' and a Tune trial id (Tune's variant
# generator: 5 hex digits, '_', a 5-digit count).
TRIAL_SUFFIX = "-abcde_00000"


def check_trial_names(run_name: str) -> None:
    """Each trial's Ray run, `<run_name>-<trial id>`, is a folder name the OS can make."""
    size = len(os.fsencode(run_name + TRIAL_SUFFIX))
    if size > NAME_MAX:
        raise ConfigError(
            f"run name {shown(run_name)} is too long for a sweep: its trials' Ray runs, <run_name>{TRIAL_SUFFIX}, "
            f"would be {size} bytes, over the {NAME_MAX} a file system allows in one name: pass a shorter --run_name"
        )


def read_base(config_argv: list[str], specs: dict[str, Spec]) -> tuple[TrainConfig, set]:
    """The sweep's base config, each sampled key at its first value: a sampled key's default is never
    trained, and must not make the base invalid (n_head=12 beside a small n_embd and a sampled n_head)."""
    first_values = [f"--{name}={spec.values[0]!r}" for name, spec in specs.items()]
    try:
        return read_config(config_argv + first_values)
    except ConfigError as first_error:
        try:
            base, _ = read_config(config_argv)
        except ConfigError:
            raise first_error from None
        check_specs(base, specs)  # names the sampled value that made the base invalid
        raise


def parse_args(argv: list[str]):
    parser = build_parser()
    return parser, *parser.parse_known_args(argv)


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m raygpt.tune",
        usage="%(prog)s [CONFIG_FILE] --key=SPEC ... [--key=value ...] [--num-samples N] [--max-concurrent K] "
        "[--asha] [launcher options]",
        add_help=False,
        description="A Ray Tune sweep over whole raygpt runs. " + " ".join(__doc__.split("\n\n")[1].split()),
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every config key")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1,
        metavar="N",
        help="samples of the search space; each grid value is tried this many times (default: %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        metavar="K",
        help="trials at a time (default: as many as the cluster holds)",
    )
    parser.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA on val_loss by iter)")
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        metavar="ITERS",
        help="iterations before ASHA may stop a trial (default: 2 eval intervals)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="the sweep's name: its experiment folder in storage_path and, beside out_dir, its trials' out_dirs "
        "(default: <run_name>-tune)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new sweep beside an earlier one of this name (<name>-2, ...); nothing is deleted. Without "
        "it, a rerun resumes an unfinished sweep and shows a finished one's results",
    )
    add_launcher_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_sweep_output()  # before Ray is imported
    try:
        parser, args, config_argv = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse already printed a usage line
        return 2 if e.code else 0
    if args.help:
        print(parser.format_help())
        print(config_help())
        return 0
    watch = OutputWatch()  # the trials' lines come first, then the table
    try:
        config_argv, specs = split_argv(config_argv)
        base, explicit_keys = read_base(config_argv, specs)
        options = LauncherOptions(args.address, args.wait_for_resources, args.prepare_input)
        grid = run_sweep(base, specs, explicit_keys, args.num_samples, args.max_concurrent, args.asha,
                         args.grace_period, options, args.name, fresh=args.fresh)  # fmt: skip
        watch.settle()
    except RaygptError as e:
        return refuse(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        watch.close()
    from raygpt.driver.sweep_report import summarize

    code = summarize(grid, list(specs), base.max_iters)
    left = unfinished_trials(grid.experiment_path, len(grid), failed_too=False)
    if left:  # Tune stopped the sweep (Ctrl-C) and saved its state
        print(f"interrupted: {count(left, 'trial')} of {len(grid)} unfinished; the same command resumes the sweep",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
