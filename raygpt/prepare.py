"""Prepare a dataset: text or parquet files -> DATA_DIR/NAME/{train,val}.bin + meta.json.

examples:
    python -m raygpt.prepare shakespeare_char [--input input.txt]   # characters, vocab 65
    python -m raygpt.prepare shakespeare [--input input.txt]        # GPT-2 BPE
    python -m raygpt.prepare openwebtext --input 'owt/*.parquet' [--text-column text]
    python -m raygpt.prepare corpus --name mycorpus --input 'docs/*.txt' [--one-doc-per-line]
    python -m raygpt.prepare openwebtext --input 'owt/*.parquet' --ray [--address HOST:PORT]  # on a cluster
    python -m raygpt.prepare shakespeare_char --data-dir s3://bucket/data   # straight to object storage

Tokens are uint16 (GPT-2's 50257 fit); meta.json says so. Inputs are checked before anything is
written; every output goes to a temporary file that is renamed into place, so a failed or interrupted
run leaves no partial train.bin and no temporary file, and a dataset folder it created but could not
fill is removed again (raygpt.prep.output). No pickle is written. meta.json records each .bin's size and
sha256, so a copy elsewhere can be verified. A URI --data-dir (s3://, gs://, any pyarrow filesystem) is
prepared in a local temporary folder and uploaded, meta.json last (raygpt.prep.dataset).
"""

from __future__ import annotations

import argparse
import os
import sys

from raygpt.errors import EXIT_INTERRUPTED, OneLineParser, refuse, run_cli
from raygpt.prep.corpus import MAX_THREADS, SEED, TEXT_COLUMN, VAL_FRACTION
from raygpt.prep.dataset import prepare_dataset
from raygpt.prep.output import PrepareError
from raygpt.prep.shakespeare import SHAKESPEARE_SETS

# Options of a corpus (the Shakespeare sets refuse them), by their argparse names.
CORPUS_OPTIONS = ("text_column", "one_doc_per_line", "val_fraction", "seed", "num_threads", "ray", "address")


def build_parser() -> argparse.ArgumentParser:
    description, _, details = __doc__.partition("\n\n")
    parser = OneLineParser(
        prog="python -m raygpt.prepare",
        description=description,
        epilog=details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "dataset",
        help="shakespeare_char (characters), shakespeare (GPT-2 BPE), or a name of your own for a "
        "corpus of --input files (GPT-2 BPE)",
    )
    parser.add_argument(
        "--input",
        metavar="FILE_OR_GLOB",
        help="a text file for the Shakespeare sets (default: download tiny Shakespeare), or a glob "
        "of .txt/.parquet files for a corpus (required)",
    )
    parser.add_argument(
        "--data-dir",
        default="data",
        metavar="DIR",
        help="outputs go to DIR/NAME; DIR may be a URI such as s3://bucket/data (default: %(default)s)",
    )
    parser.add_argument("--name", help="output folder name (default: the dataset name)")
    parser.add_argument(
        "--text-column", metavar="COLUMN", help=f"parquet column of the documents (default: {TEXT_COLUMN})"
    )
    parser.add_argument(
        "--one-doc-per-line",
        action="store_true",
        default=None,
        help="each line of a corpus text file is a document (default: each file is one)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help=f"share of a corpus's documents drawn for val (default: {VAL_FRACTION}, nanoGPT's for OpenWebText)",
    )
    parser.add_argument("--seed", type=int, help=f"seed of a corpus's train/val draw (default: {SEED}, nanoGPT's)")
    parser.add_argument(
        "--num-threads",
        type=int,
        metavar="N",
        help=f"tokenizer threads, 1 to {MAX_THREADS} (default: one per CPU, {os.cpu_count()} here)",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        default=None,
        help="tokenize a corpus with Ray tasks across the cluster (same outputs, byte for byte)",
    )
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="the Ray cluster for --ray (default: RAY_ADDRESS, else a cluster started here with `ray start`, "
        "else a local Ray)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A corpus option's default is None on the command line: given or not is seen here, and the values
    # left out take prepare_corpus's defaults.
    corpus_options = {dest: getattr(args, dest) for dest in CORPUS_OPTIONS if getattr(args, dest) is not None}
    if args.dataset in SHAKESPEARE_SETS:
        # The Shakespeare sets split 90/10 by characters, as nanoGPT's do: a corpus option would be ignored.
        if corpus_options:
            given = ", ".join(f"--{dest.replace('_', '-')}" for dest in corpus_options)
            return refuse(PrepareError(f"{given} apply to corpus datasets, not {args.dataset} (split 90/10 by "
                                       "characters, as nanoGPT's): leave them out"))  # fmt: skip
    elif args.address and not args.ray:
        return refuse(PrepareError("--address is the Ray cluster for --ray; add --ray"))
    corpus_options["use_ray"] = corpus_options.pop("ray", False)

    def prepare() -> int:
        prepare_dataset(args.dataset, args.data_dir, args.input, output_name=args.name, **corpus_options)
        return 0

    try:
        return run_cli(prepare)
    except KeyboardInterrupt:
        print("interrupted: no partial output was left; run the same command again", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
