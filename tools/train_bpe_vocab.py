"""Train a byte-level BPE vocabulary in GPT-2's file format (vocab.json + merges.txt).

For corpora without a GPT-2 vocabulary at hand (the CPU demo, other languages). The result is
read by ``--tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt``;
``<|endoftext|>`` is the last id, as in GPT-2.

    python tools/train_bpe_vocab.py --input corpus.jsonl --vocab-size 4096 --output-dir vocab/
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.errors import UserError, run_main  # noqa: E402

EOD = "<|endoftext|>"


def iter_texts(path, key):
    """The ``key`` strings of a .jsonl file. Errors are raised while the trainer iterates, so
    a bad line (or an empty file, which would give a vocabulary of bare bytes) stops the run
    before anything is written."""
    if os.path.isdir(path):
        raise UserError(f"--input {path}: is a directory, expected a .jsonl file")
    if not os.path.isfile(path):
        raise UserError(f"--input {path}: no such file")
    count = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
                if not isinstance(text, str):
                    raise TypeError(f"value is {type(text).__name__}")
            except (ValueError, KeyError, TypeError) as err:  # ValueError: JSON or UTF-8
                raise UserError(f"{path}:{lineno}: expected a JSON object with a string "
                                f"{key!r} ({err})") from None
            count += 1
            yield text
    if not count:
        raise UserError(f"--input {path}: no documents (the file is empty or has only blank "
                        f"lines)")


def train_bpe(texts, vocab_size, output_dir, min_frequency=2):
    """Train and write ``vocab.json`` and ``merges.txt`` into ``output_dir``; returns paths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab[EOD] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    os.makedirs(output_dir, exist_ok=True)
    vocab_path = os.path.join(output_dir, "vocab.json")
    merges_path = os.path.join(output_dir, "merges.txt")
    write_files_together(((vocab_path, json.dumps(vocab, ensure_ascii=False)),
                          (merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")))
    return vocab_path, merges_path


def write_files_together(files):
    """Write ``(path, text)`` pairs: each in full under a temporary name before any replaces an
    existing file, so a failed write (disk full) never leaves a new vocab beside old merges."""
    try:
        for path, content in files:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(content)
        for path, _ in files:
            os.replace(path + ".tmp", path)
    finally:
        for path, _ in files:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="A .jsonl file, one document a line.")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="Size including <|endoftext|>.")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    if args.vocab_size < 257:
        raise UserError("--vocab-size must be at least 257 (256 bytes + <|endoftext|>)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output-dir {args.output_dir}: exists and is not a directory")
    vocab, merges = train_bpe(iter_texts(args.input, args.json_key), args.vocab_size,
                              args.output_dir, args.min_frequency)
    print(f"wrote {vocab} and {merges}")


if __name__ == "__main__":
    run_main(main)
