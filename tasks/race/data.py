"""RACE (RACE/{train,dev,test}/{middle,high}/*.txt), read as Megatron-LM's tasks/race/data.py.

Each file holds one JSON object per line (RACE ships one per file): ``article``, ``questions``
[q], ``options`` [q][4], ``answers`` [q] ("A".."D"), ``id``. Every question is one sample of 4
choices; choice i is the question with "_" replaced by option i, or question + " " + option
when it has no "_", cleaned, tokenized and cut to ``max_qa_length`` (128) tokens, then
[CLS] question+option [SEP] article [SEP] with token types 0 / 1, the article cut to fit
``max_seq_length`` (Megatron's ``build_tokens_types_paddings_from_ids``). The label is the
answer's index (A 0 .. D 3).

A data path is a directory of such files (``RACE/dev/middle``, Megatron's form) or a split
directory holding ``middle/`` and ``high/`` (``RACE/dev``): each level is then read as its own
set, so evaluation reports dev-middle, dev-high and their overall. Bad JSON, a missing field,
options that are not 4 per question, an unknown answer or a missing directory is one error line
naming the file and line (or the directory).
"""

import glob
import json
import os
import time

import torch

from megatron.errors import UserError
from megatron.utils import print_rank_0
from tasks.data_utils import (build_sample, build_tokens_types_paddings_from_ids, clean_text,
                              data_error, dataset_name_from_path, read_lines)

NUM_CHOICES = 4
MAX_QA_LENGTH = 128
LEVELS = ("middle", "high")
ANSWERS = "ABCD"


def race_directories(path):
    """The directories of RACE files that the data path ``path`` names (see the module
    docstring): ``[path]``, or its ``middle`` and ``high`` subdirectories."""
    if not os.path.exists(path):
        raise UserError(f"RACE data {path}: no such directory (expected RACE/<split>/<level> "
                        "or RACE/<split> with middle/ and high/)")
    if not os.path.isdir(path):
        raise UserError(f"RACE data {path}: not a directory (expected RACE/<split>/<level> "
                        "or RACE/<split> with middle/ and high/)")
    levels = [os.path.join(path, level) for level in LEVELS
              if os.path.isdir(os.path.join(path, level))]
    return levels or [path]


def build_choice(question: str, option: str) -> str:
    """Megatron's question + option text: "_" replaced by the option, else joined by a space."""
    return question.replace("_", option) if "_" in question else " ".join([question, option])


def _check_record(path, lineno, data):
    """The RACE fields of one JSON record, checked -> (article, questions, options, labels)."""
    if not isinstance(data, dict):
        raise data_error(path, lineno, f"expected a JSON object, got {type(data).__name__}")
    missing = [k for k in ("article", "questions", "options", "answers") if k not in data]
    if missing:
        raise data_error(path, lineno, f"missing field(s) {', '.join(missing)}")
    article, questions = data["article"], data["questions"]
    options, answers = data["options"], data["answers"]
    if not isinstance(article, str) or not isinstance(questions, list) \
            or not isinstance(options, list) or not isinstance(answers, list):
        raise data_error(path, lineno, "article must be a string and questions, options and "
                         "answers lists")
    if not len(questions) == len(options) == len(answers):
        raise data_error(path, lineno, f"{len(questions)} questions, {len(options)} option "
                         f"lists and {len(answers)} answers; expected as many of each")
    labels = []
    for qi, (question, choices, answer) in enumerate(zip(questions, options, answers)):
        if not isinstance(question, str):
            raise data_error(path, lineno, f"question {qi} is not a string")
        if not isinstance(choices, list) or len(choices) != NUM_CHOICES \
                or not all(isinstance(c, str) for c in choices):
            raise data_error(path, lineno, f"question {qi}: expected {NUM_CHOICES} option "
                             f"strings, got {choices!r}")
        if answer not in tuple(ANSWERS):
            raise data_error(path, lineno, f"question {qi}: unknown answer {answer!r}; "
                             f"expected one of {', '.join(ANSWERS)}")
        labels.append(ANSWERS.index(answer))
    return article, questions, options, labels


def read_race_directory(datapath, tokenizer, max_qa_length=MAX_QA_LENGTH, log=print_rank_0):
    """-> samples ``(choice ids [4 lists], article ids, label, uid)`` of every ``*.txt`` file
    of one RACE directory, in file-name order."""
    log(f"   > working on {datapath}")
    start = time.time()
    files = sorted(glob.glob(os.path.join(datapath, "*.txt")))
    if not files:
        raise UserError(f"RACE data {datapath}: no .txt files (expected RACE's JSON files)")
    samples, num_docs, num_questions = [], 0, 0
    for path in files:
        for lineno, line in read_lines(path, "RACE file"):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise data_error(path, lineno, f"bad JSON: {err.msg} (column {err.colno})") \
                    from None
            article, questions, options, labels = _check_record(path, lineno, data)
            num_docs += 1
            context_ids = tokenizer.tokenize(clean_text(article))
            for question, choices, label in zip(questions, options, labels):
                num_questions += 1
                qa_ids = [tokenizer.tokenize(clean_text(build_choice(question, c)))[
                    :max_qa_length] for c in choices]
                samples.append((qa_ids, context_ids, label, len(samples)))
    log(f"    > processed {num_docs} document, {num_questions} questions, and "
        f"{len(samples)} samples in {time.time() - start:.2f} seconds")
    return samples


class RaceDataset(torch.utils.data.Dataset):
    """Megatron's RaceDataset: the questions of ``datapaths``; items are sample dicts with
    'text', 'types', 'padding_mask' [4, max_seq_length] (int64), 'label' and 'uid'."""

    sample_multiplier = NUM_CHOICES

    def __init__(self, dataset_name, datapaths, tokenizer, max_seq_length,
                 max_qa_length=MAX_QA_LENGTH, log=print_rank_0):
        self.dataset_name = dataset_name
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        log(f" > building RACE dataset for {dataset_name}:")
        log("  > paths: " + " ".join(datapaths))
        self.samples = []
        for path in datapaths:
            for directory in race_directories(path):
                self.samples.extend(read_race_directory(directory, tokenizer, max_qa_length,
                                                        log))
        log(f"  >> total number of samples: {len(self.samples)}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        qa_ids, context_ids, label, uid = self.samples[idx]
        t = self.tokenizer
        rows = [build_tokens_types_paddings_from_ids(qa, context_ids, self.max_seq_length,
                                                     t.cls, t.sep, t.pad) for qa in qa_ids]
        return build_sample(*([r[k] for r in rows] for k in range(3)), label, uid)


def race_eval_datasets(path, tokenizer, max_seq_length, log=print_rank_0):
    """One --valid-data entry -> [RaceDataset], one per directory it names, each called as
    Megatron names it (``RACE/dev/middle`` -> ``dev-middle``)."""
    return [RaceDataset(dataset_name_from_path(d, "RACE"), [d], tokenizer, max_seq_length,
                        log=log) for d in race_directories(path)]
