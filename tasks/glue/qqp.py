"""QQP (GLUE's QQP/{train,dev,test}.tsv), read as Megatron-LM's tasks/glue/qqp.py.

A header row, then one question pair per row, tab-separated. train/dev: 6 columns id, qid1,
qid2, question1, question2, is_duplicate (text_a = column 3, text_b = column 4, label = column 5,
0 or 1); test: 3 columns id, question1, question2 (label ``test_label``, default 0).

As Megatron, a train/dev row without 6 columns or with an empty question is skipped with a
warning naming the file and line (GLUE's QQP files hold a few such rows); a label other than 0
or 1, a non-numeric id, a test row without 3 columns or a header of another width is one error
line naming the file and line.
"""

from megatron.utils import print_rank_0
from tasks.data_utils import clean_text, data_error, parse_int, read_lines
from tasks.glue.data import GLUEDataset

LABELS = [0, 1]


def _label(path, lineno, text):
    text = text.strip()
    if text not in ("0", "1"):
        raise data_error(path, lineno, f"unknown label {text!r} (is_duplicate, column 5); "
                         "expected 0 or 1")
    return int(text)


def read_qqp_file(path, log=print_rank_0, test_label=0):
    """-> [{'text_a', 'text_b', 'label', 'uid'}] of one QQP TSV file."""
    log(f" > Processing {path} ...")
    samples, columns, skipped = [], None, 0
    for lineno, line in read_lines(path, "QQP file"):
        if not line.strip():
            continue  # a blank line (e.g. at the end of the file)
        row = line.split("\t")
        if columns is None:  # the header
            columns = len(row)
            if columns == 3:
                log(f"   reading {row[0].strip()}, {row[1].strip()}, and {row[2].strip()} "
                    f"columns and setting labels to {test_label}")
            elif columns == 6:
                log(f"    reading {row[0].strip()}, {row[3].strip()}, {row[4].strip()}, and "
                    f"{row[5].strip()} columns ...")
            else:
                raise data_error(path, lineno, f"header has {columns} columns; QQP files have "
                                 "6 (train/dev: id, qid1, qid2, question1, question2, "
                                 "is_duplicate) or 3 (test: id, question1, question2)")
            continue
        if columns == 3:
            if len(row) != 3:
                raise data_error(path, lineno, f"{len(row)} columns, expected 3 (test file)")
            text_a, text_b, label = clean_text(row[1].strip()), clean_text(row[2].strip()), \
                test_label
            if not text_a or not text_b:
                raise data_error(path, lineno, "empty question")
        else:
            if len(row) != 6:
                log(f"***WARNING*** {path}:{lineno}: {len(row)} columns, expected 6; "
                    "skipping the row")
                skipped += 1
                continue
            text_a, text_b = clean_text(row[3].strip()), clean_text(row[4].strip())
            if not text_a or not text_b:
                log(f"***WARNING*** {path}:{lineno}: empty question; skipping the row")
                skipped += 1
                continue
            label = _label(path, lineno, row[5])
        samples.append({"text_a": text_a, "text_b": text_b, "label": label,
                        "uid": parse_int(path, lineno, row[0], "id (column 0)")})
        if len(samples) % 50000 == 0:
            log(f"  > processed {len(samples)} so far ...")
    if columns is None:
        raise data_error(path, 1, "empty file; expected QQP's header row")
    log(f" >> processed {len(samples)} samples." + (f" (skipped {skipped} malformed rows)"
                                                    if skipped else ""))
    return samples


class QQPDataset(GLUEDataset):
    """Megatron's QQPDataset: the samples of ``datapaths`` (see ``read_qqp_file``)."""

    def __init__(self, name, datapaths, tokenizer, max_seq_length, test_label=0,
                 log=print_rank_0):
        def read(path, log):
            return read_qqp_file(path, log, test_label)

        super().__init__("QQP", name, datapaths, tokenizer, max_seq_length, read, log)
