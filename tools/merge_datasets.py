"""Concatenate Megatron .bin/.idx datasets into one.

    python tools/merge_datasets.py --input shards/ --output-prefix data/merged
    python tools/merge_datasets.py --inputs data/a_text_document data/b_text_document \\
        --output-prefix data/merged

``--input DIR`` merges every prefix in DIR that has both a .bin and an .idx, in sorted order (as
Megatron-LM), except the output prefix itself if it is in DIR; ``--inputs`` merges the given
prefixes in the order given. All inputs must share one token dtype. Writes
``<output-prefix>.bin/.idx`` (under temporary names until complete; those of an earlier run
that was killed are removed).
"""

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as `python tools/merge_datasets.py`: import from the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)
from megatron.errors import UserError, run_main
from tools.preprocess_data import remove_stale_temporaries


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="directory holding the .bin/.idx pairs to merge")
    src.add_argument("--inputs", nargs="+", metavar="PREFIX", help="dataset prefixes to merge")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    return p.parse_args(argv)


def prefixes_in_directory(directory):
    """Sorted dataset prefixes in ``directory``; every .idx needs its .bin and vice versa."""
    if not os.path.isdir(directory):
        raise UserError(f"--input {directory}: not a directory")
    names = os.listdir(directory)
    stems = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(directory, name)):
            stems.setdefault(stem, set()).add(ext)
    for stem, exts in sorted(stems.items()):
        if exts != {".bin", ".idx"}:
            have, missing = (".idx", ".bin") if ".idx" in exts else (".bin", ".idx")
            raise UserError(f"--input {directory}: {stem}{have} has no matching {stem}{missing}")
    if not stems:
        raise UserError(f"--input {directory}: no .bin/.idx datasets in this directory")
    return [os.path.join(directory, stem) for stem in sorted(stems)]


def main(argv=None):
    args = get_args(argv)
    out = os.path.abspath(args.output_prefix)
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--output-prefix {args.output_prefix}: directory "
                        f"{os.path.dirname(out)} does not exist")
    if args.input:
        # The output may live in the input directory (and exist from an earlier run): skip it.
        prefixes = [p for p in prefixes_in_directory(args.input) if os.path.abspath(p) != out]
        if not prefixes:
            raise UserError(f"--input {args.input}: no datasets to merge besides the output")
    else:
        prefixes = list(args.inputs)
        if out in (os.path.abspath(p) for p in prefixes):
            raise UserError(f"--output-prefix {args.output_prefix} is also one of --inputs")
    # Open (and so validate) every input first, so a bad one fails before anything is written.
    datasets = [IndexedDataset(prefix) for prefix in prefixes]
    dtypes = {ds.dtype.name for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{index_file_path(ds.path_prefix)} ({ds.dtype.name})"
                            for ds in datasets)
        raise UserError(f"inputs have different token dtypes and cannot be merged: {listing}")
    dtype = datasets[0].dtype
    del datasets

    remove_stale_temporaries(args.output_prefix, log=lambda msg: print(msg, file=sys.stderr))
    start = time.time()
    with IndexedDatasetBuilder(data_file_path(args.output_prefix), dtype=dtype) as builder:
        for prefix in prefixes:
            print(f"Merging {prefix}", file=sys.stderr)
            builder.add_index(prefix)
        builder.finalize(index_file_path(args.output_prefix))
    print(f"Wrote {args.output_prefix}.bin and .idx: {builder.num_documents} documents, "
          f"{builder.num_sequences} sequences from {len(prefixes)} datasets in "
          f"{time.time() - start:.2f} s", file=sys.stderr)
    return prefixes


if __name__ == "__main__":
    run_main(main)
