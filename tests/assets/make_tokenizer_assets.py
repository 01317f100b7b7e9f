"""Train the tiny tokenizer vocabularies used by tests/test_tokenizer.py.

Run once from the repository root; the outputs are committed:

    python tests/assets/make_tokenizer_assets.py

Produces in tests/assets/tokenizers/:
  gpt2-vocab.json, gpt2-merges.txt   byte-level BPE in GPT-2's file format, <|endoftext|> last
  bert-vocab.txt                     WordPiece vocab, [PAD] [UNK] [CLS] [SEP] [MASK] first
  spm.model                          SentencePiece BPE model, identity normalisation

The training text is built from a fixed list of standard-library docstrings plus a few
generated multilingual lines, so it needs no download. Trainers run single-threaded so a re-run
on the same Python version gives the same files.
"""

import importlib
import inspect
import io
import json
import os
import sys

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import (  # noqa: E402  (after the environment is set)
    Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers)

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers")

GPT2_VOCAB_SIZE = 1500  # before <|endoftext|> is appended
BERT_VOCAB_SIZE = 1000
SPM_VOCAB_SIZE = 600

MODULES = [
    "argparse", "collections", "json", "os", "pathlib", "re", "string", "textwrap", "itertools",
    "functools", "random", "statistics", "fractions", "decimal", "heapq", "bisect", "datetime",
    "calendar", "csv", "shutil", "tempfile", "logging", "unittest", "difflib", "inspect",
]

# Non-English lines so the vocabularies hold accented and non-Latin pieces.
EXTRA_LINES = [
    "Café au lait, crème brûlée et déjà vu: voilà le résumé naïf.",
    "Ärger über Öl und Übermut; Straße, Maß und Fuß.",
    "El niño comió piña y jamón en la mañana.",
    "Москва — столица России. Привет, мир!",
    "東京は日本の首都です。こんにちは世界。",
    "北京欢迎你，你好世界。",
    "Γειά σου Κόσμε, αυτό είναι ελληνικά.",
    "Emoji test: 🙂 🚀 ✨ and tabs\tand  double  spaces.",
]


def corpus_lines():
    """Deterministic training text: docstrings of a fixed module list, then the extra lines."""
    lines = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr))
            if doc:
                docs.append(doc)
        for doc in docs:
            lines.extend(line for line in doc.splitlines() if line.strip())
    for _ in range(20):
        lines.extend(EXTRA_LINES)
    return lines


def train_gpt2_bpe(lines):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=GPT2_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    vocab["<|endoftext|>"] = len(vocab)  # GPT-2 keeps it as the last id
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    with open(os.path.join(OUT_DIR, "gpt2-vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(OUT_DIR, "gpt2-merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("".join(m + "\n" for m in merges))
    print(f"gpt2 bpe: {len(vocab)} tokens, {len(merges)} merges")


def train_bert_wordpiece(lines):
    """A WordPiece vocab chosen by counting, not by HF's trainer (whose ties are not stable).

    Every character seen, as a word start and as a ``##`` continuation, so nothing maps to
    [UNK] except over-long words; then the most frequent whole words; then the most frequent
    word endings as ``##`` pieces. Ties break alphabetically.
    """
    from collections import Counter

    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    pre = pre_tokenizers.BertPreTokenizer()
    words = Counter()
    for line in lines:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = Counter()
    endings = Counter()
    for word, n in words.items():
        for ch in word:
            chars[ch] += n
        for k in range(2, min(5, len(word) - 1) + 1):
            endings["##" + word[-k:]] += n

    def most_common(counter):
        return [t for t, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    alphabet = most_common(chars)
    vocab += alphabet + ["##" + ch for ch in alphabet]
    seen = set(vocab)
    words_end = len(vocab) + (BERT_VOCAB_SIZE - len(vocab)) * 2 // 3  # 2/3 of the rest: words
    for word in most_common(words):
        if len(vocab) >= words_end:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    for piece in most_common(endings):
        if len(vocab) >= BERT_VOCAB_SIZE:
            break
        if piece not in seen:
            vocab.append(piece)
            seen.add(piece)
    with open(os.path.join(OUT_DIR, "bert-vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in vocab))
    print(f"bert wordpiece: {len(vocab)} tokens")


def train_sentencepiece(lines):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=SPM_VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",  # keeps the model small (no NFKC char map)
        num_threads=1,
        minloglevel=2,
    )
    with open(os.path.join(OUT_DIR, "spm.model"), "wb") as f:
        f.write(model.getvalue())
    print(f"sentencepiece: {SPM_VOCAB_SIZE} pieces")


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    lines = corpus_lines()
    n_chars = sum(map(len, lines))
    print(f"corpus: {len(lines)} lines, {n_chars} chars (python {sys.version.split()[0]})")
    train_gpt2_bpe(lines)
    train_bert_wordpiece(lines)
    train_sentencepiece(lines)


if __name__ == "__main__":
    main()
