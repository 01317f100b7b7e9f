"""Tiny finetuning and zero-shot evaluation demo on CPU, on top of the two pretraining demos.

    python examples/tiny_tasks_demo.py [--output-dir demo_tasks_output] [--epochs 3]

1. the demo GPT (examples/tiny_cpu_demo.py's checkpoint in demo_output/; the demo runs first
   when it is missing),
2. the demo BERT (examples/tiny_bert_demo.py's checkpoint in demo_bert_output/; likewise),
3. finetunes the BERT on MNLI with tasks/main.py --task MNLI (--pretrained-checkpoint: the
   pretraining heads are ignored, the classification head is initialised), printing Megatron's
   per-epoch accuracy line for dev_matched and dev_mismatched,
4. evaluates the GPT zero-shot with tasks/main.py: LAMBADA (plain and --strict-lambada) and
   WIKITEXT103 (overlapping windows, token and adjusted word-level perplexity).

The task data are the small format-faithful fixtures in tests/assets (MNLI's TSV columns,
LAMBADA's jsonl, WikiText-103's .tokens): the numbers show the path works end to end, not a
model's quality. For the real files see README.md, "Finetuning and evaluation"; the commands
are the same with their paths. Each step prints the command it runs.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_cpu_demo import run  # noqa: E402

ASSETS = os.path.join(ROOT, "tests", "assets")
MNLI = os.path.join(ASSETS, "tasks", "MNLI")
ZEROSHOT = os.path.join(ASSETS, "zeroshot")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=os.path.join(ROOT, "demo_tasks_output"))
    p.add_argument("--gpt-dir", default=os.path.join(ROOT, "demo_output"),
                   help="examples/tiny_cpu_demo.py's output directory")
    p.add_argument("--bert-dir", default=os.path.join(ROOT, "demo_bert_output"),
                   help="examples/tiny_bert_demo.py's output directory")
    p.add_argument("--epochs", type=int, default=3, help="MNLI finetuning epochs")
    p.add_argument("--pretrain-iters", type=int, default=200,
                   help="--train-iters of a pretraining demo this demo has to run first")
    return p.parse_args()


def pretrained(demo, out, iters):
    """The checkpoint directory of ``demo`` (run into ``out`` first when it has none)."""
    ckpt = os.path.join(out, "checkpoints")
    if not os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        print(f"no checkpoint in {ckpt}: running {demo} first")
        run([sys.executable, os.path.join("examples", demo), "--output-dir", out,
             "--train-iters", str(iters)])
    else:
        print(f"reusing {ckpt}")
    return ckpt


def main():
    args = parse_args()
    py, t0 = sys.executable, time.time()
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    common = ["--use-checkpoint-args", "--device", "cpu", "--num-workers", "0",
              "--log-interval", "5"]

    print("[1/4] the demo GPT")
    gpt = pretrained("tiny_cpu_demo.py", os.path.abspath(args.gpt_dir), args.pretrain_iters)
    print("[2/4] the demo BERT")
    bert = pretrained("tiny_bert_demo.py", os.path.abspath(args.bert_dir), args.pretrain_iters)

    print(f"[3/4] finetuning the BERT on MNLI ({args.epochs} epochs; watch ' > |epoch: N| "
          "metrics for dev-matched: correct / total = ...')")
    run([py, "tasks/main.py", "--task", "MNLI",
         "--train-data", os.path.join(MNLI, "train.tsv"),
         "--valid-data", os.path.join(MNLI, "dev_matched.tsv"),
         os.path.join(MNLI, "dev_mismatched.tsv"),
         "--pretrained-checkpoint", bert, "--epochs", str(args.epochs),
         "--micro-batch-size", "8", "--global-batch-size", "8", "--lr", "5e-5",
         "--lr-warmup-fraction", "0.1", "--weight-decay", "0.1", "--clip-grad", "1.0",
         "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
         "--save", os.path.join(out, "mnli"), "--save-interval", "1000", *common])

    print("[4/4] zero-shot evaluation of the GPT (LAMBADA, strict LAMBADA, WikiText-103)")
    lambada = ["--valid-data", os.path.join(ZEROSHOT, "lambada.jsonl")]
    for extra in ([], ["--strict-lambada"]):
        run([py, "tasks/main.py", "--task", "LAMBADA", "--load", gpt, *lambada, *extra,
             "--micro-batch-size", "4", *common])
    run([py, "tasks/main.py", "--task", "WIKITEXT103", "--load", gpt,
         "--valid-data", os.path.join(ZEROSHOT, "wiki.test.tokens"),
         "--overlapping-eval", "32", "--micro-batch-size", "4", *common])

    print(f"\ndemo finished in {time.time() - t0:.0f} s; the finetuned MNLI checkpoint is in "
          f"{os.path.join(out, 'mnli')}")


if __name__ == "__main__":
    main()
