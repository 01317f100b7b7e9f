"""Train a BERT WordPiece vocabulary (``vocab.txt``, one token a line) on a .jsonl corpus.

For corpora without a BERT vocabulary at hand (the CPU BERT demo, other languages). The result
is read by ``--tokenizer-type BertWordPieceLowerCase --vocab-file vocab.txt`` (or
``BertWordPieceCase`` with ``--cased``): BERT's normalisation and pre-tokenisation, the special
tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` first, ``##`` continuations.

    python tools/train_wordpiece_vocab.py --input corpus.jsonl --vocab-size 8000 \\
        --output-dir vocab/
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.errors import UserError, run_main  # noqa: E402
from tools.train_bpe_vocab import iter_texts, write_files_together  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts, vocab_size, output_dir, lower_case=True, min_frequency=2):
    """Train and write ``vocab.txt`` into ``output_dir``; returns its path."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=lower_case, lowercase=lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)  # by id: the special tokens first
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "vocab.txt")
    write_files_together([(path, "\n".join(tokens) + "\n")])
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="A .jsonl file, one document a line.")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--cased", action="store_true",
                        help="Keep case and accents (for BertWordPieceCase).")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    if args.vocab_size < len(SPECIAL_TOKENS) + 100:
        raise UserError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + 100}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output-dir {args.output_dir}: exists and is not a directory")
    path = train_wordpiece(iter_texts(args.input, args.json_key), args.vocab_size,
                           args.output_dir, lower_case=not args.cased,
                           min_frequency=args.min_frequency)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
