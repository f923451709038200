"""HellaSwag's val split (rowanz/hellaswag), downloaded once into a cache folder: what `python -m raygpt.eval
hellaswag` scores, and what a training run's evals=hellaswag scores on each checkpoint (its launcher fetches
it before the run, so no eval downloads mid-run)."""

from __future__ import annotations

import http.client
import os
import sys
import urllib.request
from pathlib import Path

from raygpt.config.schema import HELLASWAG_FILE
from raygpt.core.evals import EvalError, parse_example
from raygpt.errors import one_line
from raygpt.storage.files import write_bytes_atomic

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_VAL_EXAMPLES = 10042  # the published scores are counted over these (GPT-2 124M: 2967/10042 acc_norm)


def cached_hellaswag(cache_dir: str | Path, local_copy: str, url: str = HELLASWAG_URL) -> Path:
    """HellaSwag's val split in `cache_dir`, downloaded from `url` the first time. `local_copy`: how the user
    gives one instead, for the refusal of a failed download."""
    cached = Path(cache_dir).expanduser() / HELLASWAG_FILE
    if os.path.lexists(cached):
        return cached
    print(f"downloading HellaSwag's val split from {url}", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise EvalError(
            f"cannot download HellaSwag ({one_line(str(e)) or type(e).__name__}); pass a local copy of "
            f"{HELLASWAG_FILE} with {local_copy}"
        ) from None
    check_download(data, url, local_copy)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cached, data)
    except OSError as e:
        raise EvalError(f"cannot write {cached}: {e.strerror or e}; pass a local copy with {local_copy}") from None
    return cached


def check_download(data: bytes, url: str, local_copy: str) -> None:
    """Cache only the whole val split: a proxy's error page, or a file cut short, would otherwise be scored
    (or refused as malformed) on every later run without another download."""
    lines = [line for line in data.splitlines() if line.strip()]
    try:
        for number, line in enumerate(lines, 1):
            parse_example(line, f"line {number}")
    except EvalError as e:
        fault = str(e)
    else:
        if len(lines) == HELLASWAG_VAL_EXAMPLES:
            return
        fault = f"{len(lines)} examples, not the val split's {HELLASWAG_VAL_EXAMPLES}"
    raise EvalError(
        f"the download from {url} is not HellaSwag's val split ({fault}); nothing was cached: pass a local "
        f"copy of {HELLASWAG_FILE} with {local_copy}"
    )
