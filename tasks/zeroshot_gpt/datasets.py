"""Zero-shot GPT evaluation sets, as Megatron-LM's tasks/zeroshot_gpt/datasets.py builds them.

- WIKITEXT103 (``WindowedLMDataset``): the whole file, detokenized and tokenized, cut into
  windows of ``seq_length + 1`` tokens that start every ``stride`` (``--overlapping-eval``)
  tokens. The first window scores all its targets; every later one only its last ``stride``
  targets (the earlier ones are context, scored by a previous window), so every target of the
  file is scored exactly once, with as much left context as the window allows. Windows are
  padded with EOD, padding never scored.
- LAMBADA (``LambadaDataset``): one sample per JSONL line (``{"text": ...}``): the context and
  the label tokens, padded with EOD to ``seq_length + 1``; only the label positions are scored.
  Plain: the label is the text's last BPE token. ``--strict-lambada``: the label is the
  tokenization of ``' ' + last word`` and the context the tokenization of the text before it.

Samples are dicts of numpy arrays: ``text`` [seq_length + 1] (int64) and ``pad_mask``
[seq_length] (1 where the target ``text[i + 1]`` is scored).
"""

import json
import math
import os

import numpy as np
import torch

from megatron.errors import UserError
from tasks.zeroshot_gpt.detokenizer import get_detokenizer, wikitext_detokenizer


def count_windows(total_targets, stride):
    """Windows needed to score ``total_targets`` targets: the first window, then one per
    ``stride`` remaining targets (Megatron's ``max(ceil(max(T - stride, 0) / stride) + 1, 1)``)."""
    return max(math.ceil(max(total_targets - stride, 0) / stride) + 1, 1)


def _padded(tokens, scored, length, pad_id):
    """(``tokens`` padded with ``pad_id`` to ``length``, the scored mask of its targets).
    ``scored[i]``: token i is a scored prediction (token 0 never is: nothing predicts it)."""
    text = np.full(length, pad_id, dtype=np.int64)
    text[:len(tokens)] = tokens
    mask = np.zeros(length, dtype=np.int64)
    mask[:len(scored)] = scored
    return {"text": text, "pad_mask": mask[1:]}


class WindowedLMDataset(torch.utils.data.Dataset):
    """Overlapping windows over one token stream (see the module docstring).

    ``num_original_tokens``: words of the file before detokenization (for the word-level,
    "adjusted" perplexity); ``num_tokenized_tokens``: BPE tokens of the detokenized file.
    ``stride``: ``--overlapping-eval`` (None: ``seq_len``, i.e. disjoint windows)."""

    def __init__(self, tokens, seq_len, pad_id, num_original_tokens, num_tokenized_tokens,
                 stride=None):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.stride = max(1, seq_len if stride is None else stride)
        if self.stride > seq_len:
            raise UserError(f"--overlapping-eval {self.stride} is larger than --seq-length "
                            f"{seq_len}: the targets between windows would never be scored")
        self.num_original_tokens = num_original_tokens
        self.num_tokenized_tokens = num_tokenized_tokens
        self.total_targets = len(self.tokens) - 1
        self.num_windows = count_windows(self.total_targets, self.stride)

    def __len__(self):
        return self.num_windows

    def __getitem__(self, idx):
        start = idx * self.stride
        window = self.tokens[start:start + self.seq_len + 1]
        scored = np.ones(len(window), dtype=np.int64)
        scored[0] = 0
        if idx > 0 and self.stride != self.seq_len:
            # Only the last ``stride`` targets are new; the rest were scored before.
            scored[1:1 + self.seq_len - self.stride] = 0
        return _padded(window, scored, self.seq_len + 1, self.pad_id)


class LambadaDataset(torch.utils.data.Dataset):
    """Context + label samples (see the module docstring). ``samples``: [(context ids, label
    ids)], each at most ``seq_len + 1`` tokens together."""

    def __init__(self, samples, seq_len, pad_id):
        self.samples = samples
        self.seq_len = seq_len
        self.pad_id = pad_id

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        context, label = self.samples[idx]
        scored = [0] * len(context) + [1] * len(label)
        return _padded(context + label, scored, self.seq_len + 1, self.pad_id)


def lambada_tokens(text, tokenizer, strict):
    """(context ids, label ids) of one LAMBADA passage, as Megatron splits it."""
    if not strict:
        tokens = tokenizer.tokenize(text)
        return tokens[:-1], tokens[-1:]
    last_word = text.split()[-1]
    start = text.rfind(last_word)
    return tokenizer.tokenize(text[:start].strip()), tokenizer.tokenize(" " + last_word)


def _open_text(path, flag):
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    with open(path, "rb") as reader:
        data = reader.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({err.reason})") from None


def read_lambada(path, tokenizer, strict, seq_len, log=print):
    """LAMBADA JSONL -> ``LambadaDataset``. A line that is not a JSON object with a non-empty
    ``text`` string, or whose text leaves no context before its label, is one error naming
    ``path:line``. Blank lines are skipped. A passage longer than ``seq_len + 1`` tokens keeps
    its label and the end of its context (Megatron's reader would fail on it)."""
    samples, truncated = [], 0
    for number, line in enumerate(_open_text(path, "--valid-data").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.split():
            raise UserError(f"{path}:{number}: expected a JSON object with a non-empty 'text' "
                            f"string")
        context, label = lambada_tokens(text, tokenizer, strict)
        if not context or not label:
            raise UserError(f"{path}:{number}: the passage has no context before its last "
                            f"{'word' if strict else 'token'}")
        if len(context) + len(label) > seq_len + 1:
            keep = seq_len + 1 - len(label)
            if keep < 1:
                raise UserError(f"{path}:{number}: the last word has {len(label)} tokens, more "
                                f"than --seq-length {seq_len} can score")
            context = context[-keep:]
            truncated += 1
        samples.append((context, label))
    if not samples:
        raise UserError(f"{path}: no LAMBADA passages (expected JSON lines with 'text')")
    if truncated:
        log(f" > {truncated} passages longer than --seq-length {seq_len} + 1 tokens: kept the "
            f"end of their context")
    return LambadaDataset(samples, seq_len, tokenizer.eod)


def read_wikitext(path, tokenizer, seq_len, stride, log=print):
    """A WikiText-103 token file (wiki.test.tokens) -> ``WindowedLMDataset``.

    ``num_original_tokens`` counts the file's space-separated words before detokenization
    (Megatron's ``len(text.strip().split(" "))``). The detokenizer is chosen from the path as
    Megatron does ('ptb', 'wiki', 'lambada'); a path naming none gets WikiText's."""
    text = _open_text(path, "--valid-data")
    num_original_tokens = len(text.strip().split(" "))
    detokenizer = get_detokenizer(path) or wikitext_detokenizer
    tokens = tokenizer.tokenize(detokenizer(text))
    if len(tokens) < 2:
        raise UserError(f"{path}: fewer than 2 tokens after tokenization: nothing to score")
    if num_original_tokens < 2:
        raise UserError(f"{path}: fewer than 2 words: the word-level perplexity is undefined")
    log(f" > number of original tokens: {num_original_tokens}, number of detokenized tokens: "
        f"{len(tokens)}")
    return WindowedLMDataset(tokens, seq_len, tokenizer.eod, num_original_tokens, len(tokens),
                             stride)


def build_dataset(task, args, tokenizer, log=print):
    """The evaluation set of ``task`` ('LAMBADA' or 'WIKITEXT103') from ``--valid-data``."""
    if not args.valid_data or len(args.valid_data) != 1:
        raise UserError(f"--valid-data: {task} reads exactly one file, got "
                        f"{len(args.valid_data or [])}")
    path = args.valid_data[0]
    if task == "LAMBADA":
        log(f"> building lambada dataset from {path} ...")
        dataset = read_lambada(path, tokenizer, args.strict_lambada, args.seq_length, log)
        log(f" > found {len(dataset)} samples.")
        return dataset
    if task == "WIKITEXT103":
        return read_wikitext(path, tokenizer, args.seq_length, args.overlapping_eval, log)
    raise UserError(f"--task {task}: not a zero-shot GPT task (LAMBADA, WIKITEXT103)")
