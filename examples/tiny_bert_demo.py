"""Tiny end-to-end BERT pretraining demo on CPU, on text every Python installation ships.

    python examples/tiny_bert_demo.py [--output-dir demo_bert_output] [--train-iters 200]

1. builds a corpus (.jsonl) from the documentation Python ships (as examples/tiny_cpu_demo.py),
2. trains a small BERT WordPiece vocabulary (tools/train_wordpiece_vocab.py),
3. preprocesses the corpus into a sentence-level .bin/.idx (tools/preprocess_data.py
   --split-sentences, 2 workers),
4. pretrains a small BERT with pretrain_bert.py (masked LM + sentence order) and random-LTD (the
   middle layers start on a random quarter of the tokens and grow to all of them; the progress
   line shows 'lm loss', 'sop loss' and the kept length),
5. loads the checkpoint and prints the model's top predictions for masked words.

Each step is the real tool a user would run on the PILE; the commands are printed as they run.
Re-running reuses the corpus, vocabulary and data; training resumes from the checkpoint in
``--output-dir`` unless ``--fresh`` is given.
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_cpu_demo import build_corpus, demo_args, run  # noqa: E402

#: Sentences about Python whose masked word the model is asked to fill in.
PROBES = [
    "Return a new [MASK] containing all items from the iterable.",
    "The [MASK] statement is used to import modules.",
    "Raise a ValueError if the [MASK] is not found.",
    "This function returns the number of [MASK] in the string.",
]


def fill_mask(load_dir, vocab_file, sentences, top_k=5):
    """The checkpoint's top ``top_k`` tokens for each [MASK] of each sentence."""
    import torch

    from megatron.checkpointing import read_checkpoint_file
    from megatron.model import BertModel
    from megatron.tokenizer import build_tokenizer
    from tools.generate_text import checkpoint_path, config_from_args

    path = checkpoint_path(load_dir)
    ckpt = read_checkpoint_file(path)
    args = ckpt["args"]
    binary_head = getattr(args, "bert_binary_head", True)
    model = BertModel(config_from_args(args, num_tokentypes=2 if binary_head else 0),
                      add_binary_head=binary_head)
    model.load_checkpoint_state(ckpt["model"], path)
    model.eval()
    tok = build_tokenizer(args.tokenizer_type, vocab_file=vocab_file)
    results = []
    for sentence in sentences:
        before, after = sentence.split("[MASK]")
        ids = ([tok.cls] + tok.tokenize(before) + [tok.mask] + tok.tokenize(after) + [tok.sep])
        position = ids.index(tok.mask)
        tokens = torch.tensor([ids])
        with torch.no_grad():
            logits, _ = model(tokens, torch.ones_like(tokens),
                              tokentype_ids=torch.zeros_like(tokens) if binary_head else None)
        scores = logits[0, position, :tok.vocab_size].float()
        best = scores.topk(top_k).indices.tolist()
        results.append((sentence, [tok.inv_vocab[i] for i in best]))
    return results


def main():
    args, out = demo_args(__doc__.splitlines()[0], "demo_bert_output")
    py = sys.executable
    t0 = time.time()
    corpus = build_corpus(out)

    vocab = os.path.join(out, "vocab", "vocab.txt")
    if not os.path.exists(vocab):
        print("[2/5] training a BERT WordPiece vocabulary")
        run([py, "tools/train_wordpiece_vocab.py", "--input", corpus, "--vocab-size",
             str(args.vocab_size), "--output-dir", os.path.dirname(vocab)])
    else:
        print(f"[2/5] vocabulary: reusing {vocab}")

    prefix = os.path.join(out, "data", "stdlib")
    data = prefix + "_text_sentence"
    if not os.path.exists(data + ".idx"):
        print("[3/5] preprocessing into a sentence-level .bin/.idx (--split-sentences)")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        run([py, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix,
             "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", vocab,
             "--split-sentences", "--workers", "2", "--log-interval", "500"])
    else:
        print(f"[3/5] data: reusing {data}.bin/.idx")

    ckpt = os.path.join(out, "checkpoints")
    ramp = max(1, int(0.7 * args.train_iters))
    print("[4/5] pretraining a small BERT (4 layers, hidden 256, seq 128) on CPU with random-LTD:"
          f" the middle layers keep 32 of 128 tokens at first, all 128 after {ramp} iterations "
          "(watch 'random ltd reserved length', 'lm loss' and 'sop loss')")
    run([py, "pretrain_bert.py",
         "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
         "--seq-length", "128", "--max-position-embeddings", "128",
         "--micro-batch-size", "16", "--global-batch-size", "32",
         "--train-iters", str(args.train_iters), "--lr", "1e-3", "--min-lr", "1e-4",
         "--lr-decay-style", "linear", "--lr-warmup-iters", "20", "--weight-decay", "0.01",
         "--clip-grad", "1.0", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
         "--random-ltd", "--random-ltd-start", "32", "--random-ltd-step", "16",
         "--random-ltd-schedule-steps", str(ramp),
         "--data-path", data, "--split", "98,2,0",
         "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", vocab,
         "--make-vocab-size-divisible-by", "64",
         "--log-interval", "10", "--eval-interval", "100", "--eval-iters", "5",
         "--save", ckpt, "--load", ckpt, "--save-interval", "100",
         "--tensorboard-dir", os.path.join(out, "tensorboard"),
         "--num-workers", "0", "--device", "cpu"])

    print("[5/5] masked-word predictions of the trained model (a few hundred CPU iterations "
          "leave masked-LM training near its early plateau, where frequent words win; the "
          "guesses turn to context with --train-iters in the thousands)")
    for sentence, best in fill_mask(ckpt, vocab, PROBES):
        print(f"  {sentence}\n      -> {', '.join(best)}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; outputs in {out} "
          f"(tensorboard --logdir {os.path.join(out, 'tensorboard')})")


if __name__ == "__main__":
    main()
