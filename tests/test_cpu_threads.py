"""One thread choice for training, raygpt.bench and raygpt.sample (core.parallel.cpu_threads), and what a
device cannot compile: the compile mode a CPU falls back to, said in one line before the compile starts.
Fast tier: pure functions, /proc/stat, and one local-mode launch that stops before any compile."""

import os

import pytest
from conftest import TINY_LOCAL_RUN

from raygpt import launch
from raygpt.config.schema import COMPILE_MODES
from raygpt.core.parallel import (
    CpuThreads,
    busy_cores,
    compile_mode_for,
    compile_notices,
    cpu_threads,
    process_cores,
)


@pytest.mark.parametrize(
    "cores, busy, requested, expected",
    [
        (2, 0.0, None, CpuThreads(2, 2)),  # a quiet machine: one thread per core
        (2, 0.3, None, CpuThreads(2, 2)),  # a little background work takes no core
        (2, 0.5, None, CpuThreads(1, 2, busy=1)),  # half a core or more is taken
        (2, 1.0, None, CpuThreads(1, 2, busy=1)),
        (2, 7.5, None, CpuThreads(1, 2, busy=1)),  # never fewer than one thread
        (16, 1.2, None, CpuThreads(15, 16, busy=1)),
        (1, 0.0, None, CpuThreads(1, 1)),
        (2, 1.0, 4, CpuThreads(4, 2, requested=True)),  # --threads wins, busy or not
        (2.0, 0.0, None, CpuThreads(2, 2)),  # a Ray worker's CPUs are a float
        (0.5, 0.0, None, CpuThreads(1, 1)),  # a fraction of a CPU still computes on one thread
    ],
)
def test_one_thread_per_core_no_other_process_keeps_busy(cores, busy, requested, expected):
    assert cpu_threads(cores, busy, requested) == expected


@pytest.mark.parametrize(
    "choice, line",
    [
        (CpuThreads(2, 2), "cpu: 2 threads (of 2 cores; --threads N to change)"),
        (CpuThreads(1, 2, busy=1), "cpu: 1 thread (of 2 cores, 1 busy with other processes; --threads N to change)"),
        (CpuThreads(3, 1, requested=True), "cpu: 3 threads (of 1 core; set by --threads)"),
    ],
)
def test_the_thread_line_says_the_choice_and_how_to_change_it(choice, line):
    assert choice.describe() == line


def test_busy_cores_measures_a_share_of_this_process_cores():
    cores = process_cores()
    assert cores == sorted(os.sched_getaffinity(0))
    assert 0.0 <= busy_cores(cores, seconds=0.05) <= len(cores)
    assert busy_cores([], seconds=0.0) == 0.0  # no core of this process: nothing to measure


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_a_cpu_compiles_in_the_default_mode_and_says_so_where_the_config_asked_another(mode):
    assert compile_mode_for(mode, "cuda") == (mode, None)
    used, notice = compile_mode_for(mode, "cpu")
    assert used == "default"
    if mode == "default":
        assert notice is None
    else:
        assert notice.startswith(f"compile_mode={mode} uses ") and "which need a GPU" in notice
        assert notice.endswith("compiling for the CPU in the default mode") and "\n" not in notice


def test_the_compile_notice_says_a_cpu_compile_takes_long_and_how_to_skip_it():
    assert compile_notices("default", "cpu") == [
        "compiling the model (torch.compile on CPU can take minutes; --compile=False to skip)"
    ]
    assert compile_notices("reduce-overhead", "cpu", skip="leave out --compile")[1].endswith(
        "(torch.compile on CPU can take minutes; leave out --compile to skip)"
    )
    assert compile_notices("reduce-overhead", "cuda") == ["compiling the model... (takes a ~minute)"]


def test_a_gpu_config_trained_on_a_cpu_says_what_it_compiles_before_it_compiles(tmp_path, char_data, capsys):
    """configs/train_shakespeare_char.py's compile settings on a CPU, through the launcher in local mode.
    eval_only with an eager eval: the worker says its lines and stops before the first compiled call."""
    argv = [*(a for a in TINY_LOCAL_RUN if a != "--compile=False"), f"--data_dir={char_data}",
            f"--out_dir={tmp_path / 'out'}", f"--storage_path={tmp_path / 'ray'}", "--compile=True",
            "--compile_mode=reduce-overhead", "--compile_eval=False", "--eval_only=True"]  # fmt: skip
    assert launch.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    notice = lines.index(
        "compile_mode=reduce-overhead uses CUDA graphs, which need a GPU: compiling for the CPU in the default mode"
    )
    assert lines[notice + 1] == "compiling the model (torch.compile on CPU can take minutes; --compile=False to skip)"
