"""Staging throughput (MB/s) of a ~100 MB dataset from an S3-compatible server on loopback (moto).

    python benchmarks/staging_throughput.py [--mb 100] [--repeats 5]

The server runs in its own process (`moto_server`), as a real store would: a server in the same process
would share its interpreter lock with the client. Prints the upload rate (prepare's path to a URI), the
median cold-stage rate into an empty node cache, a re-stage that finds the cache current, and sha256 over
the same bytes on this CPU for reference. moto keeps objects in memory and serves them from Python, so
these figures bound raygpt's own overhead from below, not a real store's bandwidth.
"""

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from raygpt.prep.output import write_arrays, write_dataset
from raygpt.storage.datasets import stage_dataset, upload_dataset


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [Path(sys.executable).with_name("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("moto_server did not start") from None
            time.sleep(0.1)


def make_dataset(folder: Path, megabytes: int) -> None:
    """Random GPT-2 token ids, 90% train, written by prepare's own writer (sizes and sha256 in meta.json)."""
    tokens = np.random.default_rng(0).integers(0, 50257, size=megabytes * 500_000, dtype=np.uint16)
    split = len(tokens) * 9 // 10
    folder.mkdir(parents=True)
    write_dataset(folder, {"vocab_size": 50257, "tokenizer": "gpt2"}, write_arrays(tokens[:split], tokens[split:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="dataset size in MB (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="cold stages to take the median of")
    args = parser.parse_args()
    server, endpoint = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1"
    )
    work = Path(tempfile.mkdtemp(prefix="raygpt-staging-bench-"))
    try:
        import pyarrow.fs

        pyarrow.fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("bench")
        local, uri = work / "prepared" / "synthetic", "s3://bench/data/synthetic"
        make_dataset(local, args.mb)
        total_mb = sum((local / name).stat().st_size for name in ("train.bin", "val.bin")) / 1e6

        start = time.perf_counter()
        upload_dataset(local, uri, progress=lambda line: None)
        upload_rate = total_mb / (time.perf_counter() - start)

        rates = []
        for repeat in range(args.repeats):
            cache = work / f"cache{repeat}"
            start = time.perf_counter()
            stage_dataset(uri, cache, progress=lambda line: None)
            rates.append(total_mb / (time.perf_counter() - start))
            if repeat:  # keep the first cache for the warm stage below
                shutil.rmtree(cache)
        start = time.perf_counter()
        stage_dataset(uri, work / "cache0", progress=lambda line: None)
        warm_seconds = time.perf_counter() - start

        data = (local / "train.bin").read_bytes()
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        hash_rate = len(data) / 1e6 / (time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    print(f"| dataset | upload | cold stage (median of {args.repeats}) | warm stage | sha256 on this CPU |")
    print("|---|---|---|---|---|")
    print(
        f"| {total_mb:,.1f} MB | {upload_rate:,.0f} MB/s | {statistics.median(rates):,.0f} MB/s "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f}) | {warm_seconds * 1000:,.0f} ms | {hash_rate:,.0f} MB/s |"
    )


if __name__ == "__main__":
    main()
