#!/usr/bin/env bash
# Ray's cost and memory on one GPU, in one command: raygpt's training step timed without Ray
# (raygpt.bench), through one Ray Train worker (raygpt.launch) and in Ray Train's local mode (the same
# loop in the driver process, no Ray workers), GPT-2 124M, bf16, compile,
# micro-batch 12 x 4 accumulation; then peak memory per micro-batch for GPT-2 124M and gpt2-xl sizes.
#   bash benchmarks/ray_overhead.sh OUT_DIR        (SKIP_MEMORY=1: Ray's cost only)
set -u
out=${1:-/tmp/raygpt-overhead}
mkdir -p "$out/data/owt_random"
python3 - "$out/data/owt_random" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0)
for split, n in (("train", 20_000_000), ("val", 1_000_000)):
    rng.integers(0, 50257, n, dtype=np.uint16).tofile(f"{sys.argv[1]}/{split}.bin")
PY
common="--wandb_log=False --compile=True --gradient_accumulation_steps=4"
echo "== without Ray (raygpt.bench), micro-batch 12"
python3 -m raygpt.bench configs/train_gpt2.py $common --batch_size=12 --steps 30 --warmup 10 | tail -1
# Median logged ms/iter of iterations 10-39 of raygpt.launch with the given extra arguments.
launch_median() {
  python3 -m raygpt.launch configs/train_gpt2.py $common --batch_size=12 --dataset=owt_random --data_dir="$out/data" \
    --max_iters=40 --eval_interval=100000 --eval_iters=1 --log_interval=1 --warmup_iters=5 --lr_decay_iters=400 \
    --always_save_checkpoint=False "$@" 2>&1 | tee -a "$out/launch.log" | grep -E "iter (1[0-9]|2[0-9]|3[0-9]):" \
    | sed -E 's/.*time ([0-9.]+)ms.*/\1/' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
echo "== one Ray worker (raygpt.launch), micro-batch 12"
echo "median ms/iter through Ray: $(launch_median --out_dir="$out/o" --storage_path="$out/r")"
echo "== the same loop in Ray Train's local mode (raygpt.launch --local_mode=True), micro-batch 12"
echo "median ms/iter in local mode: $(launch_median --out_dir="$out/o-local" --local_mode=True)"
[ "${SKIP_MEMORY:-0}" = 1 ] && exit 0  # Ray's cost only
echo "== peak memory by micro-batch (no Ray, accumulation 1)"
for b in 16 32 48 64; do python3 -m raygpt.bench configs/train_gpt2.py --wandb_log=False --compile=True \
  --gradient_accumulation_steps=1 --batch_size=$b --steps 5 --warmup 3 2>&1 | tail -1; done
for b in 4 8 16; do python3 -m raygpt.bench configs/train_gpt2.py --wandb_log=False --compile=True --n_layer=48 \
  --n_head=25 --n_embd=1600 --gradient_accumulation_steps=1 --batch_size=$b --steps 3 --warmup 2 2>&1 | tail -1; done
