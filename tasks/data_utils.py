"""What the finetuning readers share (Megatron-LM's tasks/data_utils.py): text clean-up, the
BERT input of a text pair ([CLS] a [SEP] b [SEP], token types, padding), the sample dict, and
reading text files with errors that name the file and line.

Truncation is Megatron's (``build_tokens_types_paddings_from_ids``), kept exactly so that
finetuning here sees the inputs Megatron-LM's finetuning saw: when [CLS] a [SEP] b reaches
``max_seq_length`` tokens it is cut to ``max_seq_length - 1`` from the end (so b loses its tail
first, then a) and a final [SEP] is appended. Padding positions get token type 0 (Megatron pads
the types with the pad id, which is 0 in BERT's vocabularies).
"""

import os
import re
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron.errors import UserError


def clean_text(text: str) -> str:
    """Megatron's clean_text: newlines and runs of whitespace to one space, ' . ' to '. '."""
    text = text.replace("\n", " ")
    text = re.sub(r"\s+", " ", text)
    for _ in range(3):
        text = text.replace(" . ", ". ")
    return text


def build_tokens_types_paddings_from_ids(text_a_ids: Sequence[int],
                                         text_b_ids: Optional[Sequence[int]],
                                         max_seq_length: int, cls_id: int, sep_id: int,
                                         pad_id: int) -> Tuple[List[int], List[int], List[int]]:
    """[CLS] a [SEP] (b [SEP]) -> (ids, types, paddings), each ``max_seq_length`` long
    (Megatron's function; see the module docstring for its truncation)."""
    ids = [cls_id, *text_a_ids, sep_id]
    types = [0] * len(ids)
    if text_b_ids is not None:
        ids.extend(text_b_ids)
        types.extend([1] * len(text_b_ids))
    trimmed = len(ids) >= max_seq_length
    if trimmed:
        ids, types = ids[:max_seq_length - 1], types[:max_seq_length - 1]
    if text_b_ids is not None or trimmed:
        ids.append(sep_id)
        types.append(0 if text_b_ids is None else 1)
    paddings = [1] * len(ids)
    padding_length = max_seq_length - len(ids)
    if padding_length > 0:
        ids.extend([pad_id] * padding_length)
        types.extend([0] * padding_length)
        paddings.extend([0] * padding_length)
    return ids, types, paddings


def build_tokens_types_paddings_from_text(text_a: str, text_b: Optional[str], tokenizer,
                                          max_seq_length: int):
    """Tokenize ``text_a`` (and ``text_b``) and build the pair input (see ``..._from_ids``)."""
    text_b_ids = None if text_b is None else tokenizer.tokenize(text_b)
    return build_tokens_types_paddings_from_ids(tokenizer.tokenize(text_a), text_b_ids,
                                                max_seq_length, tokenizer.cls, tokenizer.sep,
                                                tokenizer.pad)


def build_sample(ids, types, paddings, label: int, unique_id: int) -> dict:
    """Megatron's sample dict: 'text', 'types', 'padding_mask' (int64 arrays), 'label', 'uid'."""
    return {"text": np.asarray(ids, dtype=np.int64), "types": np.asarray(types, dtype=np.int64),
            "padding_mask": np.asarray(paddings, dtype=np.int64), "label": int(label),
            "uid": int(unique_id)}


def data_error(path: str, lineno: int, message: str) -> UserError:
    """A one-line error about line ``lineno`` (1-based) of ``path``."""
    return UserError(f"{path}:{lineno}: {message}")


def require_file(path: str, what: str) -> None:
    """A one-line UserError unless ``path`` is a readable file."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path}: is a directory, expected a file")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")


def read_lines(path: str, what: str) -> Iterator[Tuple[int, str]]:
    """(1-based line number, line without its line ending) of a UTF-8 text file; a missing
    file or undecodable bytes are one-line errors."""
    require_file(path, what)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise data_error(path, lineno, f"not UTF-8 text ({err.reason} at byte "
                                               f"{err.start})") from None
            yield lineno, line.rstrip("\r\n")


def parse_int(path: str, lineno: int, text: str, column: str) -> int:
    """``text`` as a non-negative int, else a one-line error naming the column."""
    try:
        value = int(text.strip())
    except ValueError:
        raise data_error(path, lineno, f"{column} {text.strip()!r} is not an integer") \
            from None
    if value < 0:
        raise data_error(path, lineno, f"{column} {value} is negative")
    return value


def dataset_name_from_path(path: str, marker: str) -> str:
    """The evaluation set's name, as Megatron derives it: the part of ``path`` after the last
    ``marker`` ('MNLI', 'QQP', 'RACE'), without its extension and outer slashes, '_' and '/'
    turned into '-' (``MNLI/dev_matched.tsv`` -> ``dev-matched``, ``RACE/dev/middle`` ->
    ``dev-middle``). A path without ``marker`` is named by its last component. Megatron's
    ``strip('.tsv')`` removes those characters from both ends (``QQP/dev.tsv`` -> ``de``);
    here only the extension goes."""
    path = os.path.normpath(path)
    tail = path.split(marker)[-1] if marker in path else os.path.basename(path)
    root, ext = os.path.splitext(tail)
    if ext in (".tsv", ".txt", ".json", ".jsonl"):
        tail = root
    return tail.strip("/").replace("_", "-").replace("/", "-") or marker
