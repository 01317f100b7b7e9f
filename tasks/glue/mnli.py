"""MNLI (GLUE's MNLI/{train,dev_matched,dev_mismatched,test_matched,test_mismatched}.tsv), read as
Megatron-LM's tasks/glue/mnli.py.

A header row, then one pair per row, tab-separated: train rows have 12 columns, dev 16, test 10
(no label). text_a = column 8 (sentence1), text_b = column 9 (sentence2), uid = column 0
(index), label = the last column (gold_label), mapped in Megatron's order contradiction 0,
entailment 1, neutral 2; test rows get the label ``test_label`` (default contradiction). Every
row must have the header's column count; a wrong count, an unknown label, an empty sentence or a
non-numeric index is one error line naming the file and line.
"""

from megatron.utils import print_rank_0
from tasks.data_utils import clean_text, data_error, parse_int, read_lines
from tasks.glue.data import GLUEDataset

LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}
COLUMNS = {12: "train", 16: "dev", 10: "test"}  # column count -> kind of file


def read_mnli_file(path, log=print_rank_0, test_label="contradiction"):
    """-> [{'text_a', 'text_b', 'label', 'uid'}] of one MNLI TSV file."""
    log(f" > Processing {path} ...")
    samples, columns, is_test = [], None, False
    for lineno, line in read_lines(path, "MNLI file"):
        if not line.strip():
            continue  # a blank line (e.g. at the end of the file)
        row = line.split("\t")
        if columns is None:  # the header
            columns = len(row)
            if columns not in COLUMNS:
                raise data_error(path, lineno, f"header has {columns} columns; MNLI files have "
                                 "12 (train), 16 (dev_matched/dev_mismatched) or 10 (test)")
            is_test = COLUMNS[columns] == "test"
            if is_test:
                log(f"   reading {row[0].strip()}, {row[8].strip()} and {row[9].strip()} "
                    f"columns and setting labels to {test_label}")
            else:
                log(f"    reading {row[0].strip()} , {row[8].strip()}, {row[9].strip()}, and "
                    f"{row[-1].strip()} columns ...")
            continue
        if len(row) != columns:
            raise data_error(path, lineno, f"{len(row)} columns, expected {columns} as the "
                             f"header ({COLUMNS[columns]} file)")
        text_a, text_b = clean_text(row[8].strip()), clean_text(row[9].strip())
        label = test_label if is_test else row[-1].strip()
        if label not in LABELS:
            raise data_error(path, lineno, f"unknown label {label!r}; expected one of "
                             f"{', '.join(LABELS)}")
        for name, text in (("sentence1 (column 8)", text_a), ("sentence2 (column 9)", text_b)):
            if not text:
                raise data_error(path, lineno, f"empty {name}")
        samples.append({"text_a": text_a, "text_b": text_b, "label": LABELS[label],
                        "uid": parse_int(path, lineno, row[0], "index (column 0)")})
        if len(samples) % 50000 == 0:
            log(f"  > processed {len(samples)} so far ...")
    if columns is None:
        raise data_error(path, 1, "empty file; expected MNLI's header row")
    log(f" >> processed {len(samples)} samples.")
    return samples


class MNLIDataset(GLUEDataset):
    """Megatron's MNLIDataset: the samples of ``datapaths`` (see ``read_mnli_file``)."""

    def __init__(self, name, datapaths, tokenizer, max_seq_length, test_label="contradiction",
                 log=print_rank_0):
        def read(path, log):
            return read_mnli_file(path, log, test_label)

        super().__init__("MNLI", name, datapaths, tokenizer, max_seq_length, read, log)
