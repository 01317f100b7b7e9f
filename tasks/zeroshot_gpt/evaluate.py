"""GPT zero-shot evaluation (Megatron-LM's tasks/zeroshot_gpt/evaluate.py): LAMBADA accuracy and
WikiText-103 perplexity of a GPT checkpoint, printed as Megatron prints them.

    python tasks/main.py --task WIKITEXT103 --valid-data wikitext-103/wiki.test.tokens \\
        --load checkpoints/gpt-350m --overlapping-eval 32 ... (the checkpoint's model flags)
    python tasks/main.py --task LAMBADA --strict-lambada --valid-data lambada_test.jsonl ...

The evaluation runs in the pretraining loop's machinery (``megatron.training``): any tensor,
pipeline and data parallelism; the weights come from ``--load`` (as Megatron's zero-shot
evaluation) or ``--pretrained-checkpoint`` (any TP/PP layout). The whole set is evaluated once:
every window (sample) on exactly one data-parallel rank, the sums over every micro-batch and
rank (no mean of means). WIKITEXT103 sums the loss of every target and reports
``val_loss = total / (num_tokenized_tokens - 1)``, ``ppl = exp(min(20, val_loss))``,
``token_ratio = (num_tokenized_tokens - 1) / (num_original_tokens - 1)`` and the word-level
``adjusted ppl = exp(min(20, val_loss * token_ratio))``; LAMBADA counts the passages whose every
label token is the model's argmax.
"""

import math

import torch

from megatron.errors import UserError
from megatron.parallel.mappings import gather_from_tp_region
from megatron.training import Provider, run_pretraining
from megatron.utils import get_ltor_masks_and_position_ids, print_rank_0
from tasks.zeroshot_gpt.datasets import build_dataset

EVAL_METRIC = {"LAMBADA": "accuracy", "WIKITEXT103": "loss"}


def _unwrap(model):
    """The LanguageModule inside a data-parallel wrapper."""
    return getattr(model, "module", model)


def get_batch(batch, device, eod, args):
    """(tokens, labels, scored mask, valid mask, attention mask, position ids) of a batch."""
    text = batch["text"].to(device=device, dtype=torch.long)
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()  # [b, s] each
    attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
        tokens, eod, reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss)
    scored = batch["pad_mask"].to(device=device, dtype=torch.float32)  # [b, s]
    valid = batch["eval_valid"].to(device=device, dtype=torch.float32)  # [b]
    return tokens, labels, scored, valid, attention_mask, position_ids


def count_correct(logits, labels, scored, valid, parallel):
    """Passages whose every scored target is the argmax of ``logits`` [b, s, V/tp] (the
    vocabulary gathered over tensor-parallel ranks at the scored positions only) -> (correct,
    valid passages), padding passages (``valid`` 0) left out."""
    rows, cols = scored.nonzero(as_tuple=True)
    picked = gather_from_tp_region(logits[rows, cols].contiguous(), parallel)  # [n, V]
    wrong = (picked.argmax(dim=-1) != labels[rows, cols]).float()  # [n]
    wrong_per_row = torch.zeros(labels.size(0), device=labels.device).index_add_(0, rows, wrong)
    correct = ((wrong_per_row == 0).float() * valid).sum()
    return correct, valid.sum()


def forward_step_provider(eval_metric):
    """The evaluation's ``forward_step`` provider: ``loss`` (WIKITEXT103) reports
    ``{"lm loss": (summed loss of the scored targets, their count)}``; ``accuracy`` (LAMBADA)
    ``{"correct": (correct passages, passages)}``."""

    def provider(args, tokenizer):
        device = torch.device(args.device)

        def forward_step(data_iterator, model, token_drop=None):
            tokens, labels, scored, valid, attention_mask, position_ids = get_batch(
                next(data_iterator), device, tokenizer.eod, args)
            if eval_metric == "loss":
                output = model(tokens, position_ids, attention_mask, labels=labels)
            else:
                output = model(tokens, position_ids, attention_mask)

            def loss_func(out):
                if eval_metric == "loss":
                    mask = scored * valid[:, None]
                    total = (out.float() * mask).sum()
                    return total, {"lm loss": (total, mask.sum())}
                correct, count = count_correct(out, labels, scored, valid,
                                               _unwrap(model).parallel)
                return correct, {"correct": (correct, count)}

            return output, loss_func

        return forward_step

    return provider


def format_results(task, eval_metric, total, dataset):
    """(Megatron's result line, metrics dict) from the summed ``total`` over ``dataset``."""
    line = f" validation results on {task} | "
    if eval_metric == "loss":
        tokenized, original = dataset.num_tokenized_tokens, dataset.num_original_tokens
        val_loss = total / (tokenized - 1)
        ppl = math.exp(min(20, val_loss))
        token_ratio = (tokenized - 1) / (original - 1)
        adjusted_ppl = math.exp(min(20, val_loss * token_ratio))
        line += (f"avg loss: {val_loss:.4E} | ppl: {ppl:.4E} | adjusted ppl: "
                 f"{adjusted_ppl:.4E} | token ratio: {token_ratio} |")
        metrics = {"avg loss": val_loss, "ppl": ppl, "adjusted ppl": adjusted_ppl,
                   "token ratio": token_ratio, "num tokenized tokens": tokenized,
                   "num original tokens": original}
    else:
        examples = len(dataset)
        accuracy = total / examples
        line += (f"number correct: {total:.4E} | total examples: {examples:.4E} | "
                 f"avg accuracy: {accuracy:.4E}")
        metrics = {"number correct": total, "total examples": examples,
                   "avg accuracy": accuracy}
    return line, metrics


def print_framed(line, log):
    """Megatron's frame: a line of dashes one longer than the text, above and below."""
    log("-" * (len(line) + 1))
    log(line)
    log("-" * (len(line) + 1))


def _check_counts(eval_metric, sums, dataset):
    """Every target (passage) counted exactly once over the ranks, or a bug is reported."""
    name = "lm loss" if eval_metric == "loss" else "correct"
    total, count = sums.get(name, (0.0, 0.0))
    expected = dataset.num_tokenized_tokens - 1 if eval_metric == "loss" else len(dataset)
    if round(count) != expected:
        raise RuntimeError(f"evaluation scored {count} "
                           f"{'targets' if eval_metric == 'loss' else 'passages'}, expected "
                           f"{expected}")
    return total


def check_args(args):
    """Flags the zero-shot tasks need."""
    import pretrain_gpt

    pretrain_gpt.check_args(args)
    if args.task not in EVAL_METRIC:
        raise UserError(f"--task {args.task}: not a zero-shot GPT task (LAMBADA, WIKITEXT103)")


def prepare_evaluation_only(args):
    """Evaluation only, as Megatron's zero-shot main: ``--load`` supplies the model weights
    alone (``--finetune``: no optimizer, scheduler, RNG or iteration), and the loop's optimizer
    and LR schedule, built but never stepped, get a learning rate and a one-iteration horizon
    when the command line has none (--skip-train keeps the loop from training)."""
    if args.load is not None:
        args.finetune = True
    if args.lr is None:
        args.lr = 0.0
    if not args.train_iters and not args.train_samples and not args.train_tokens:
        args.train_iters = 1


def main(args, log=print_rank_0):
    """Evaluate ``args.task`` (LAMBADA or WIKITEXT103) and print Megatron's result lines;
    returns the metrics (the same on every rank)."""
    import pretrain_gpt

    check_args(args)
    eval_metric = EVAL_METRIC[args.task]
    found = {}
    prepare_evaluation_only(args)
    if args.load is None and getattr(args, "pretrained_checkpoint", None) is None:
        log(" > WARNING: no --load or --pretrained-checkpoint: evaluating randomly initialised "
            "weights")

    def prepare(args, tokenizer, log):
        found["dataset"] = build_dataset(args.task, args, tokenizer, log)

    def after_training(args, state, step, log):
        from megatron.data.samplers import build_eval_data_loader

        dataset = found["dataset"]
        loader = build_eval_data_loader(dataset, args.eval_micro_batch_size,
                                        step.parallel.dp_rank, step.parallel.dp_size)
        sums = step.evaluate_dataset(loader)
        total = _check_counts(eval_metric, sums, dataset)
        line, found["metrics"] = format_results(args.task, eval_metric, total, dataset)
        print_framed(line, log)

    provider = Provider(model=pretrain_gpt.model_provider,
                        datasets=lambda args, tokenizer, num_samples: (None, None, None),
                        forward_step=forward_step_provider(eval_metric), prepare=prepare,
                        after_training=after_training)
    run_pretraining(args, provider, log=log)
    log("done :-)")
    return found["metrics"]
