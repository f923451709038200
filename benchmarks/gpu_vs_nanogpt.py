"""nanoGPT's train.py and raygpt (1 Ray worker) side by side on one GPU, in one command.

    python benchmarks/gpu_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT all --corpus tinyshakespeare.txt
    python benchmarks/gpu_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT throughput [--batch-sizes 12 32] [--iters 30]
    python benchmarks/gpu_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT shakespeare --corpus tinyshakespeare.txt [--warm]
    python benchmarks/gpu_vs_nanogpt.py --nanogpt PATH/TO/nanoGPT memory \
        [--sizes-124m 32 64 96 120] [--sizes-xl 8 16 18 20]

all: the three scenarios below, one after the other (about 25 minutes on an H100).

throughput: GPT-2 124M (12 layers, 768, block 1024, bias False, vocab 50304, bf16, compile) on random
tokens; median ms/iter after warm-up, tokens/s, MFU (nanoGPT's FLOPs per token over 989 TFLOP/s on
H100 SXM / H200) and peak memory is not reported by train.py, so the table gives what both print.
shakespeare: configs/train_shakespeare_char.py as is; best val loss and wall time from command to exit.
--warm runs each raygpt tool a second time with its compile caches kept (Inductor's, and raygpt's own
in storage_path), as a user's second run would find them; nanoGPT runs once, cold, and is the baseline.
memory: the largest micro-batch that fits for GPT-2 124M and gpt2-xl (raygpt.bench, accumulation 1),
trying the given sizes in increasing order until one runs out of memory, with the peak memory of each.
Each scenario appends a table to --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_vs_nanogpt import run_and_parse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEAK_MEMORY = str(Path(__file__).resolve().parent / "peak_memory.py")  # prints nanoGPT's peak GPU memory


def gpt2_flops_per_iter(tokens_per_iter: int) -> float:
    n_params = 123_587_328  # get_num_params() of GPT-2 124M: vocab 50304, bias False, wpe left out
    return (6 * n_params + 12 * 12 * 12 * 64 * 1024) * tokens_per_iter


def throughput(args, env) -> list[str]:
    data = args.work_dir / "data" / "owt_random"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 100_000_000), ("val", 1_000_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    nanogpt_data = args.nanogpt / "data" / "owt_random"
    shutil.rmtree(nanogpt_data, ignore_errors=True)
    shutil.copytree(data, nanogpt_data)
    rows = []
    common = [
        "--dataset=owt_random",
        "--wandb_log=False",
        f"--gradient_accumulation_steps={args.accum}",
        f"--max_iters={args.iters}",
        f"--lr_decay_iters={args.iters * 10}",
        "--warmup_iters=5",
        "--eval_interval=100000",
        "--eval_iters=1",
        "--log_interval=1",
        "--compile=True",
    ]
    for batch_size in args.batch_sizes:
        results = [
            run_and_parse(
                f"nanoGPT train.py, micro-batch {batch_size}",
                [
                    sys.executable,
                    PEAK_MEMORY,
                    "train.py",
                    "config/train_gpt2.py",
                    *common,
                    f"--batch_size={batch_size}",
                    f"--out_dir={args.work_dir / 'out-n'}",
                ],
                args.nanogpt,
                args.work_dir / f"nanogpt-{batch_size}.log",
                env,
            ),
            run_and_parse(
                f"raygpt, micro-batch {batch_size}",
                [
                    sys.executable,
                    "-m",
                    "raygpt.launch",
                    "configs/train_gpt2.py",
                    *common,
                    f"--batch_size={batch_size}",
                    f"--data_dir={args.work_dir / 'data'}",
                    f"--out_dir={args.work_dir / f'out-r{batch_size}'}",
                    f"--storage_path={args.work_dir / 'ray'}",
                    "--num_workers=1",
                    "--always_save_checkpoint=False",
                ],
                REPO,
                args.work_dir / f"raygpt-{batch_size}.log",
                env,
            ),
        ]
        tokens = batch_size * 1024 * args.accum
        for r in results:
            dt = r["median_ms"] / 1000
            mfu = gpt2_flops_per_iter(tokens) / dt / 989e12
            rows.append(
                f"| {r['name']} | {r['median_ms']:.1f} | {tokens / dt:,.0f} | {mfu * 100:.1f}% | "
                f"{gib(r)} | {r['median_ms'] / results[0]['median_ms']:.3f}x |"
            )
    return [
        "| GPT-2 124M, bf16, compile | ms/iter | tokens/s | MFU | peak memory | time vs nanoGPT |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def gib(result: dict) -> str:
    return f"{result['peak_gib']:.2f} GiB" if result.get("peak_gib") is not None else "n/a"


def shakespeare(args, env) -> list[str]:
    sys.path.insert(0, str(REPO))
    import pickle

    from raygpt.core.tokenizer import load_meta
    from raygpt.prep.shakespeare import prepare_shakespeare_char

    dataset_dir = prepare_shakespeare_char(args.work_dir / "data", args.corpus)
    nanogpt_data = args.nanogpt / "data" / "shakespeare_char"
    for name in ("train.bin", "val.bin"):
        shutil.copy(dataset_dir / name, nanogpt_data / name)
    chars = load_meta(dataset_dir)["chars"]
    with open(nanogpt_data / "meta.pkl", "wb") as f:  # nanoGPT's own format, only in its checkout
        pickle.dump(
            {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f
        )
    extra = args.extra or []
    commands = {
        "nanoGPT train.py": (
            [
                sys.executable,
                PEAK_MEMORY,
                "train.py",
                "config/train_shakespeare_char.py",
                f"--out_dir={args.work_dir / 'out-n'}",
            ],
            args.nanogpt,
        ),
        "raygpt": (
            [
                sys.executable,
                "-m",
                "raygpt.launch",
                "configs/train_shakespeare_char.py",
                f"--data_dir={args.work_dir / 'data'}",
                f"--out_dir={args.work_dir / 'out-r'}",
                f"--storage_path={args.work_dir / 'ray'}",
                "--num_workers=1",
                *extra,
            ],
            REPO,
        ),
        # One Ray worker, evaluating eagerly (compile_eval=False): no second graph to compile or load.
        "raygpt eager eval": (
            [
                sys.executable,
                "-m",
                "raygpt.launch",
                "configs/train_shakespeare_char.py",
                f"--data_dir={args.work_dir / 'data'}",
                f"--out_dir={args.work_dir / 'out-e'}",
                f"--storage_path={args.work_dir / 'ray-eager'}",
                "--num_workers=1",
                "--compile_eval=False",
                *extra,
            ],
            REPO,
        ),
        # The same loop in Ray Train's local mode: no Ray processes to start.
        "raygpt local_mode": (
            [
                sys.executable,
                "-m",
                "raygpt.launch",
                "configs/train_shakespeare_char.py",
                f"--data_dir={args.work_dir / 'data'}",
                f"--out_dir={args.work_dir / 'out-l'}",
                f"--storage_path={args.work_dir / 'ray-local'}",
                "--local_mode=True",
                *extra,
            ],
            REPO,
        ),
    }
    results = []
    for name, (command, cwd) in commands.items():
        if name != "nanoGPT train.py" and name not in args.tools:
            continue
        # Each tool gets its own, initially empty, compile caches: the first run compiles from scratch,
        # a --warm rerun finds what it compiled itself (as a user's second run would), never the other's.
        slug = name.split()[0] + ("-local" if "local" in name else "") + ("-eager" if "eager" in name else "")
        cache = args.work_dir / f"cache-{slug}"
        shutil.rmtree(cache, ignore_errors=True)
        tool_env = {
            **env,
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_CACHE_DIR": str(cache / "triton"),
        }
        for storage in ("ray", "ray-eager", "ray-local"):  # raygpt's compile cache lives in storage: cold means empty
            shutil.rmtree(args.work_dir / storage, ignore_errors=True)
        # nanoGPT runs once, cold: the goals are ratios to its cold wall time.
        for attempt in ("cold", "warm")[: 2 if args.warm and name != "nanoGPT train.py" else 1]:
            for storage in ("ray", "ray-eager", "ray-local"):  # a rerun must not resume the last run; the cache stays
                for run in (args.work_dir / storage).glob("*"):
                    if run.name != "compile-cache":
                        shutil.rmtree(run, ignore_errors=True)
            for out in ("out-n", "out-r", "out-l", "out-e"):
                shutil.rmtree(args.work_dir / out, ignore_errors=True)
            result = run_and_parse(
                f"{name} ({attempt} compile cache)",
                command,
                cwd,
                args.work_dir / f"{slug}-shakespeare-{attempt}.log",
                tool_env,
            )
            results.append(result)
    rows = [
        "| shakespeare_char config | best val loss (iter) | median ms/iter | peak memory | wall s (command to exit) "
        "| wall vs nanoGPT (cold) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        it, best = min(r["evals"], key=lambda e: e[1])
        baseline = results[0]["wall_s"]  # nanoGPT's run
        rows.append(
            f"| {r['name']} | {best:.4f} ({it}) | {r['median_ms']:.2f} | {gib(r)} | {r['wall_s']:.1f} | "
            f"{r['wall_s'] / baseline:.3f}x |"
        )
    return rows


def bench_row(command: list[str], env: dict) -> list[str] | None:
    """raygpt.bench's result row as fields, or None when the GPU ran out of memory."""
    import subprocess

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        if "OutOfMemoryError" in done.stdout + done.stderr:
            return None
        sys.exit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    row = [
        line
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| device", "| ---"))
    ][-1]
    return [field.strip() for field in row.strip("|").split("|")]


def memory(args, env) -> list[str]:
    rows = ["| model | micro-batch | ms/step | tokens/s | MFU | peak memory |", "| --- | --- | --- | --- | --- | --- |"]
    xl = ["--n_layer=48", "--n_head=25", "--n_embd=1600"]
    for label, extra, sizes in (("GPT-2 124M", [], args.sizes_124m), ("gpt2-xl", xl, args.sizes_xl)):
        for batch_size in sorted(sizes):
            fields = bench_row(
                [
                    sys.executable,
                    "-m",
                    "raygpt.bench",
                    "configs/train_gpt2.py",
                    "--wandb_log=False",
                    "--compile=True",
                    "--gradient_accumulation_steps=1",
                    f"--batch_size={batch_size}",
                    *extra,
                    "--steps",
                    "3",
                    "--warmup",
                    "2",
                ],
                env,
            )
            if fields is None:
                rows.append(f"| {label} | {batch_size} | out of memory | | | |")
                break
            # raygpt.bench's columns: device, params, micro-batch x accum, block, dtype, compile, attention,
            # ms/step, tokens/s, MFU, peak mem
            rows.append(f"| {label} | {batch_size} | {fields[7]} | {fields[8]} | {fields[9]} | {fields[10]} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", required=True, type=Path)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/raygpt-bench-gpu"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu_results.md")
    sub = parser.add_subparsers(dest="scenario", required=True)
    tp = sub.add_parser("throughput")
    tp.add_argument("--batch-sizes", type=int, nargs="+", default=[12, 32])
    tp.add_argument("--accum", type=int, default=4)
    tp.add_argument("--iters", type=int, default=30)
    sh = sub.add_parser("shakespeare")
    mem = sub.add_parser("memory")
    everything = sub.add_parser("all", help="throughput, shakespeare and memory with their defaults")
    for p in (sh, everything):
        p.add_argument("--corpus", type=Path, required=True)
        p.add_argument("--extra", nargs="*", help="extra raygpt overrides")
        p.add_argument("--warm", action="store_true", help="run raygpt twice: cold, then warm compile caches")
        p.add_argument(
            "--tools",
            nargs="+",
            default=["raygpt", "raygpt local_mode"],
            help="raygpt runs beside nanoGPT: 'raygpt' (one Ray worker), 'raygpt eager eval', 'raygpt local_mode'",
        )
    for p in (mem, everything):
        p.add_argument("--sizes-124m", type=int, nargs="+", default=[32, 64, 96, 120])
        p.add_argument("--sizes-xl", type=int, nargs="+", default=[8, 16, 18, 20])
    everything.set_defaults(batch_sizes=[12, 32], accum=4, iters=30)
    args = parser.parse_args()
    args.nanogpt = args.nanogpt.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    scenarios = {"throughput": throughput, "shakespeare": shakespeare, "memory": memory}
    import torch

    command = (
        f"python benchmarks/gpu_vs_nanogpt.py --nanogpt PATH {' '.join(sys.argv[sys.argv.index(args.scenario) :])}"
    )
    for name in scenarios if args.scenario == "all" else [args.scenario]:
        rows = scenarios[name](args, env)
        # Each table goes to --out as soon as it is done: a long `all` run loses nothing if stopped.
        header = (
            f"\n## {name} ({time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name()}, "
            f"torch {torch.__version__})\n\nCommand: `{command}`\n\n"
        )
        with open(args.out, "a") as f:
            f.write(header + "\n".join(rows) + "\n")
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
