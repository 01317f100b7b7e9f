"""Finetuning a BERT checkpoint on a downstream task (Megatron-LM's tasks/finetune_utils.py and
tasks/eval_utils.py), on the pretraining loop (``megatron.training``): any TP/PP/DP layout,
--save/--load resume, logging, --pretrained-checkpoint weights at iteration 0.

A task (``TaskSpec``: GLUE's classifier, RACE's multiple choice) gives its model, datasets and
metrics; ``finetune`` builds the ``Provider`` whose hooks run the epochs:

- ``prepare`` reads --train-data and every --valid-data set and sets
  ``--train-iters = epochs x iterations per epoch``;
- training order: each epoch a permutation of the training set seeded by (--seed, epoch), laid
  out one epoch after another as one long dataset (``EpochShuffledDataset``) that the loop's
  sequential sampler reads from its consumed-samples counter: every data-parallel rank takes its
  slice of each global batch, and a run resumed mid-epoch continues with the very next batch.
  The last incomplete global batch of an epoch is dropped, or with --keep-last filled with
  zero-weight copies, the loss then being the mean over its real samples;
- ``after_iteration`` evaluates at the end of every epoch on each --valid-data set (the whole set
  once, summed over DP ranks) and prints Megatron's lines
  `` > |epoch: E| metrics for NAME: correct / total = C / T = P %, elapsed time (sec): S`` and
  `` >> |epoch: E| overall: correct / total = C / T = P %`` (E counts from 0 as Megatron's), and
  asks for a checkpoint (Megatron saves at the end of every epoch);
- ``after_training`` with --epochs 0 only evaluates (epoch -1).

Tasks with F1 (QQP) also print `` > |epoch: E| f1 for NAME: tp / fp / fn = a / b / c, f1 = F %``
and the overall F1, from the summed counts.
"""

import dataclasses
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from megatron.errors import UserError
from megatron.training import Provider, PretrainResult, run_pretraining
from megatron.utils import print_rank_0

@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a finetuning task gives ``finetune``."""

    name: str
    model_class: type
    """A ``megatron.model.classification.PooledHeadModel`` subclass."""
    model_kwargs: dict
    """Extra constructor arguments (``num_classes``)."""
    train_dataset: Callable
    """(args, tokenizer, paths, log) -> the training dataset of the --train-data paths."""
    eval_datasets: Callable
    """(args, tokenizer, path, log) -> [datasets with ``dataset_name``] of one --valid-data."""
    f1: bool = False
    """Also report F1 of class 1 (QQP)."""
    rows_per_sample: int = 1
    """Sequences per sample (RACE: 4 choices)."""


# -- metrics -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Counts:
    """Summed evaluation counts of one set (or of all sets)."""

    correct: int = 0
    total: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other):
        return Counts(*(a + b for a, b in zip(dataclasses.astuple(self),
                                              dataclasses.astuple(other))))

    @property
    def accuracy(self) -> float:
        """Percent correct."""
        return 100.0 * self.correct / self.total if self.total else float("nan")

    @property
    def f1(self) -> float:
        """Percent F1 of class 1 from the summed counts: 2 tp / (2 tp + fp + fn)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 100.0 * 2 * self.tp / denominator if denominator else 0.0


@dataclasses.dataclass
class EpochMetrics:
    """The evaluation after one epoch (-1: evaluation only): per set, and overall."""

    epoch: int
    sets: Dict[str, Counts]
    overall: Counts


@dataclasses.dataclass
class FinetuneResult:
    """What ``finetune`` returns: the loop's result and the metrics of every evaluation."""

    run: PretrainResult
    metrics: List[EpochMetrics]


def _counts(sums) -> Counts:
    def get(name):
        return int(round(sums.get(name, (0.0, 0.0))[0]))

    return Counts(get("correct"), int(round(sums.get("correct", (0.0, 0.0))[1])),
                  get("true positives"), get("false positives"), get("false negatives"))


def print_metrics(log, epoch, name, counts, elapsed, f1):
    """Megatron's per-set accuracy line (and ours for F1)."""
    log(f" > |epoch: {epoch}| metrics for {name}: correct / total = {counts.correct} / "
        f"{counts.total} = {counts.accuracy:.4f} %, elapsed time (sec): {elapsed:.3f}")
    if f1:
        log(f" > |epoch: {epoch}| f1 for {name}: tp / fp / fn = {counts.tp} / {counts.fp} / "
            f"{counts.fn}, f1 = {counts.f1:.4f} %")


def print_overall(log, epoch, counts, f1):
    """Megatron's overall accuracy line (and ours for F1)."""
    log(f" >> |epoch: {epoch}| overall: correct / total = {counts.correct} / {counts.total} = "
        f"{counts.accuracy:.4f} %")
    if f1:
        log(f" >> |epoch: {epoch}| overall: f1 = {counts.f1:.4f} %")


# -- training data -----------------------------------------------------------------------------

class EpochShuffledDataset(torch.utils.data.Dataset):
    """``epochs`` shuffled passes over ``dataset``, one after another, in whole global batches.

    Epoch e is the permutation of ``dataset`` drawn from (``seed``, e) (a pure function, the
    same in every process and after a resume), cut to ``iterations_per_epoch`` global batches:
    ``len(dataset) // global_batch_size`` (the rest dropped), or with ``keep_last`` one more,
    filled up with zero-weight copies. Items carry ``'loss_weight'``: global batch size / real
    samples in its global batch (1 in a full batch, 0 for the filling), so the mean over a
    micro-batch of weight x loss, averaged over micro-batches and DP ranks, is the mean over
    the real samples of the global batch.

    One spare global batch of filling follows the last epoch: the loop's sampler needs a sample
    left to start from when a run that already finished is resumed.
    """

    def __init__(self, dataset, epochs, global_batch_size, seed, keep_last=False):
        self.dataset = dataset
        self.epochs = epochs
        self.global_batch_size = global_batch_size
        self.seed = seed
        n = len(dataset)
        self.iterations_per_epoch = -(-n // global_batch_size) if keep_last \
            else n // global_batch_size
        if self.iterations_per_epoch == 0:
            raise UserError(f"the training data has {n} samples, fewer than one global batch "
                            f"(--global-batch-size {global_batch_size}); pass --keep-last or a "
                            "smaller --global-batch-size")
        self.samples_per_epoch = self.iterations_per_epoch * global_batch_size
        self._order = (None, None)

    def __len__(self):
        return (self.epochs * self.iterations_per_epoch + 1) * self.global_batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of the dataset's indices for ``epoch``."""
        if self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(len(self.dataset)))
        return self._order[1]

    def __getitem__(self, idx):
        epoch, position = divmod(idx, self.samples_per_epoch)
        n = len(self.dataset)
        if epoch >= self.epochs or position >= n:  # filling: a copy that weighs nothing
            weight = 0.0
            sample = self.dataset[int(self.order(min(epoch, self.epochs - 1))[0])]
        else:
            first = position - position % self.global_batch_size
            real = min(self.global_batch_size, n - first)
            weight = self.global_batch_size / real
            sample = self.dataset[int(self.order(epoch)[position])]
        return {**sample, "loss_weight": np.float32(weight)}


# -- forward steps -----------------------------------------------------------------------------

def _batch_to_device(batch, device):
    """The model inputs and labels of a batch, as int64 on ``device``."""
    return {k: batch[k].to(device=device, dtype=torch.long)
            for k in ("text", "types", "padding_mask", "label")}


def _token_drop(token_drop, batch, fields, special_ids):
    """random-LTD for the batch's rows ([b, s], or [b * c, s] for c choices: row ids
    sample id * c + choice, so every row has its own draw)."""
    from megatron.ltd.driver import token_drop_for_batch

    if token_drop is None:
        return None
    tokens = fields["text"].reshape(-1, fields["text"].size(-1))
    padding = fields["padding_mask"].reshape(tokens.shape)
    rows = tokens.size(0) // batch["index"].size(0)
    sample_ids = (batch["index"].view(-1, 1) * rows + torch.arange(rows)).view(-1)
    special = torch.isin(tokens, torch.tensor(special_ids, device=tokens.device))
    drop, _ = token_drop_for_batch(token_drop, sample_ids, tokens=tokens,
                                   special_mask=special & (padding > 0),
                                   padding_mask=padding == 0)
    return drop


def _run_model(model, fields, drop=None):
    return model(fields["text"], fields["padding_mask"], tokentype_ids=fields["types"],
                 token_drop=drop)


def train_forward_step_provider(on_batch=None):
    """The training ``forward_step`` provider: cross entropy of the logits against 'label',
    weighted by 'loss_weight' (``EpochShuffledDataset``), logged as Megatron's 'lm loss' (the
    mean over the real samples). ``on_batch(batch)``: called with every training batch."""

    def provider(args, tokenizer):
        device = torch.device(args.device)
        special_ids = [tokenizer.cls, tokenizer.sep]

        def forward_step(data_iterator, model, token_drop=None):
            batch = next(data_iterator)
            if on_batch is not None:
                on_batch(batch)
            fields = _batch_to_device(batch, device)
            weight = batch["loss_weight"].to(device=device, dtype=torch.float32)
            output = _run_model(model, fields, _token_drop(token_drop, batch, fields,
                                                           special_ids))

            def loss_func(logits):
                losses = F.cross_entropy(logits.float(), fields["label"], reduction="none")
                real = (weight > 0).float()
                loss = (losses * weight).sum() / weight.numel()
                return loss, {"lm loss": ((losses.detach() * real).sum(), real.sum())}

            return output, loss_func

        return forward_step

    return provider


def eval_forward_step(args, f1=False):
    """The evaluation ``forward_step``: correct / total over the valid samples ('eval_valid'
    1; the loader's padding is left out), and with ``f1`` the true/false positives and false
    negatives of class 1, each as a ratio summed by ``StepRunner.evaluate_dataset``."""
    device = torch.device(args.device)

    def forward_step(data_iterator, model, token_drop=None):
        batch = next(data_iterator)
        fields = _batch_to_device(batch, device)
        valid = batch["eval_valid"].to(device=device).bool()
        output = _run_model(model, fields)

        def loss_func(logits):
            labels = fields["label"]
            predicted = logits.argmax(dim=-1)
            total = valid.sum()
            report = {"correct": (((predicted == labels) & valid).sum(), total)}
            if f1:
                yes, truth = predicted == 1, labels == 1
                report["true positives"] = ((yes & truth & valid).sum(), total)
                report["false positives"] = ((yes & ~truth & valid).sum(), total)
                report["false negatives"] = ((~yes & truth & valid).sum(), total)
            loss = F.cross_entropy(logits.float(), labels)
            return loss, report

        return output, loss_func

    return forward_step


# -- the run -------------------------------------------------------------------------------------

def classifier_flops_per_sample(rows=1):
    """FLOPs of one sample's forward and backward: ``rows`` sequences through the encoder (no
    LM head; the pooler and the task head are negligible)."""
    from megatron.model.utils import gpt_flops_per_iteration

    def flops(args, kept_lengths=None):
        return rows * gpt_flops_per_iteration(
            1, args.seq_length, args.num_layers, args.hidden_size, 0,
            ffn_hidden_size=args.ffn_hidden_size, kept_lengths=kept_lengths,
            recompute=args.recompute_granularity == "full")

    return flops


def model_provider(spec: TaskSpec):
    """(args, parallel) -> this rank's part of the task model (its pipeline stage's layers)."""

    def provide(args, parallel):
        from megatron.arguments import transformer_config_from_args
        from megatron.parallel.pipeline_utils import model_layer_ids

        layer_ids = model_layer_ids(args, parallel)
        config = transformer_config_from_args(args, num_tokentypes=2)
        return spec.model_class(config, **spec.model_kwargs, parallel=parallel,
                                pre_process=parallel.is_first_stage,
                                post_process=parallel.is_last_stage, layer_ids=layer_ids)

    return provide


def check_task_args(args):
    """Flag checks of every finetuning task (one line each)."""
    from megatron.ltd.config import check_model_type

    if args.epochs is None:
        raise UserError(f"--task {args.task}: --epochs is required (0: evaluation only)")
    if args.epochs < 0:
        raise UserError(f"--epochs must be >= 0, got {args.epochs}")
    if args.epochs > 0 and not args.train_data:
        raise UserError(f"--task {args.task}: --train-data is required to finetune "
                        "(--epochs 0 only evaluates)")
    if args.dataloader_type != "single":
        raise UserError(f"--dataloader-type {args.dataloader_type}: finetuning shuffles every "
                        "epoch itself (seeded by --seed); leave the flag out")
    if args.position_embedding_type != "learned_absolute":
        raise UserError("--position-embedding-type: BERT tasks use learned absolute position "
                        "embeddings")
    if getattr(args, "random_ltd", False) and args.random_ltd_method != "random":
        raise UserError(f"--random-ltd-method {args.random_ltd_method}: finetuning tasks drop "
                        "tokens with random-LTD only ('random')")
    check_model_type(args, "encoder", "tasks/main.py")


def _check_tokenizer(tokenizer):
    try:
        for name in ("cls", "sep", "pad"):
            getattr(tokenizer, name)
    except (AttributeError, NotImplementedError):
        raise UserError(f"--tokenizer-type {type(tokenizer).__name__}: BERT tasks need a "
                        "tokenizer with [CLS], [SEP] and [PAD] (BertWordPieceLowerCase or "
                        "BertWordPieceCase)") from None


class FinetuneRun:
    """One finetuning run: the provider's hooks and what they share."""

    def __init__(self, spec: TaskSpec, log=print_rank_0):
        self.spec = spec
        self.log = log
        self.train: Optional[EpochShuffledDataset] = None
        self.eval_sets = []
        self.metrics: List[EpochMetrics] = []
        self._announced_epoch = None

    # hooks
    def prepare(self, args, tokenizer, log):
        """Read the data; --train-iters from --epochs."""
        _check_tokenizer(tokenizer)
        if args.epochs > 0:
            dataset = self.spec.train_dataset(args, tokenizer, args.train_data, log)
            self.train = EpochShuffledDataset(dataset, args.epochs, args.global_batch_size,
                                              args.seed, keep_last=args.keep_last)
            args.train_iters = args.epochs * self.train.iterations_per_epoch
            log(f" > {len(dataset)} training samples: {self.train.iterations_per_epoch} "
                f"iterations per epoch of {args.global_batch_size} ("
                f"{'last batch kept' if args.keep_last else 'last incomplete batch dropped'}"
                f"), {args.epochs} epochs = {args.train_iters} iterations")
        else:  # evaluation only: the optimizer and LR schedule are built, never stepped
            args.skip_train = True
            args.train_iters = 1
            if args.lr is None:
                args.lr = 0.0
        # The loop's own --eval-iters evaluation has no dataset here (the epochs' metrics
        # replace it): no validation/test sample targets either.
        args.eval_iters = 0
        for path in args.valid_data or ():
            for dataset in self.spec.eval_datasets(args, tokenizer, path, log):
                if len(dataset) == 0:
                    raise UserError(f"--valid-data {path}: no samples")
                self.eval_sets.append(dataset)
        if not self.eval_sets:
            log("WARNING: no --valid-data: no accuracy will be reported")

    def datasets(self, args, tokenizer, num_samples):
        return self.train, None, None

    def on_train_batch(self, batch):
        """Megatron's ``working on epoch N ...``, before the epoch's first iteration."""
        epoch = int(batch["index"][0]) // self.train.samples_per_epoch
        if epoch != self._announced_epoch and epoch < self.train.epochs:
            self._announced_epoch = epoch
            self.log(f"working on epoch {epoch + 1} ...")

    def after_iteration(self, args, state, step, log):
        """At the end of an epoch: evaluate, and ask for a checkpoint."""
        per_epoch = self.train.iterations_per_epoch
        if state.iteration % per_epoch != 0:
            return False
        self.evaluate(args, step, state.iteration // per_epoch - 1, log)
        return True

    def after_training(self, args, state, step, log):
        if args.epochs == 0:
            log("evaluation only mode, setting epoch to -1")
            self.evaluate(args, step, -1, log)

    # evaluation
    def evaluate(self, args, step, epoch, log):
        """Every --valid-data set once: Megatron's lines, and the counts kept in
        ``self.metrics``."""
        from megatron.data.samplers import build_eval_data_loader

        if not self.eval_sets:
            return
        log("calculating metrics ...")
        forward_step = eval_forward_step(args, self.spec.f1)
        sets, overall = {}, Counts()
        for dataset in self.eval_sets:
            start = time.time()
            loader = build_eval_data_loader(dataset, args.eval_micro_batch_size,
                                            step.parallel.dp_rank, step.parallel.dp_size,
                                            num_workers=args.num_workers)
            counts = _counts(step.evaluate_dataset(loader, forward_step))
            print_metrics(log, epoch, dataset.dataset_name, counts, time.time() - start,
                          self.spec.f1)
            sets[dataset.dataset_name] = counts
            overall = overall + counts
        print_overall(log, epoch, overall, self.spec.f1)
        self.metrics.append(EpochMetrics(epoch, sets, overall))

    def provider(self) -> Provider:
        spec = self.spec
        return Provider(model=model_provider(spec), datasets=self.datasets,
                        forward_step=train_forward_step_provider(self.on_train_batch),
                        flops_per_sample=classifier_flops_per_sample(spec.rows_per_sample),
                        load_policy=spec.model_class.load_policy(), check_args=check_task_args,
                        prepare=self.prepare, after_iteration=self.after_iteration,
                        after_training=self.after_training,
                        rows_per_sample=spec.rows_per_sample)


def finetune(args, spec: TaskSpec, log=print_rank_0) -> FinetuneResult:
    """Finetune (or with --epochs 0 evaluate) ``spec``'s task with the parsed ``args``."""
    run = FinetuneRun(spec, log)
    provider = run.provider()
    provider.check_args(args)
    result = run_pretraining(args, provider, log=log)
    return FinetuneResult(result, run.metrics)
