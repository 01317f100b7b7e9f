"""The training log line and TensorBoard scalars (Megatron-DeepSpeed's names and format)."""

import math
import time
from array import array
from collections.abc import Sequence

import torch

_FLOAT_FORMATS = {"params norm": ".3f"}  # as Megatron's log line; other floats .1f


class LossHistory(Sequence):
    """Every iteration's losses, ``[(iteration, {name: float})]``, stored compactly.

    A list of (int, dict) pairs costs ~300 bytes per iteration (~90 MB per rank over a
    300k-iteration run); here an iteration costs 18 bytes plus 8 per loss. Reads like a list
    of pairs (indexing, slicing, iteration, ``+`` and ``==`` with lists).
    """

    def __init__(self):
        self._iterations = array("q")
        self._offsets = array("q", [0])
        self._keyset_of = array("H")
        self._keysets, self._keyset_ids = [], {}
        self._values = array("d")

    def append(self, iteration, losses):
        keys = tuple(losses)
        if keys not in self._keyset_ids:
            self._keyset_ids[keys] = len(self._keysets)
            self._keysets.append(keys)
        self._iterations.append(int(iteration))
        self._keyset_of.append(self._keyset_ids[keys])
        self._values.extend(float(losses[k]) for k in keys)
        self._offsets.append(len(self._values))

    def __len__(self):
        return len(self._iterations)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("loss history index out of range")
        keys = self._keysets[self._keyset_of[index]]
        values = self._values[self._offsets[index]:self._offsets[index + 1]]
        return self._iterations[index], dict(zip(keys, values))

    def __add__(self, other):
        return list(self) + list(other)

    def __eq__(self, other):
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self):
        return f"LossHistory({list(self)!r})"


class TrainingLogger:
    """Accumulates losses between log lines and writes console lines and TensorBoard scalars.

    The console line follows Megatron-DeepSpeed's ``training_log``, with tokens per second and
    an estimated TFLOP/s; TensorBoard tags are plotted against iterations, consumed samples
    (``... vs samples``) and consumed tokens (``... vs tokens``).
    """

    def __init__(self, args, log=print, write=True):
        """``write``: this rank writes TensorBoard (as Megatron, the last rank only in
        multi-process runs)."""
        self.args = args
        self.log = log
        self.writer = None
        self.train_history = LossHistory()  # [(iteration, {name: float})]
        self.valid_history = LossHistory()
        self.test_history = LossHistory()
        if args.tensorboard_dir and write:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir,
                                        max_queue=args.tensorboard_queue_size)
        self._reset()

    def _reset(self):
        self.loss_sums = {}
        self.loss_counts = 0
        self.loss_key_counts = {}  # a name reported on some iterations only (SCTD's dual steps)
        self.skipped = 0
        self.nan = 0
        self.interval_start = time.time()
        self.interval_iters = 0
        self.interval_flops = 0.0

    def scalar(self, tag, value, iteration, samples=None, tokens=None, layer_tokens=None):
        """One TensorBoard scalar, with its ``vs samples`` / ``vs tokens`` / ``vs layer tokens``
        twins (layer tokens put random-LTD and baseline runs on one compute axis)."""
        if self.writer is None:
            return
        self.writer.add_scalar(tag, value, iteration)
        if samples is not None:
            self.writer.add_scalar(f"{tag} vs samples", value, samples)
        if tokens is not None:
            self.writer.add_scalar(f"{tag} vs tokens", value, tokens)
        if layer_tokens is not None:
            self.writer.add_scalar(f"{tag} vs layer tokens", value, layer_tokens)

    def training_step(self, state, loss_dict, lr, grad_norm, loss_scale, skipped, extra=None,
                      flops=None, layer_tokens=None, batch_size=None):
        """Record one iteration; print a line every --log-interval iterations.

        ``extra``: {tensorboard tag: (console label or None for TensorBoard only, value)};
        ``flops``: model FLOPs of this iteration; ``layer_tokens``: consumed so far;
        ``batch_size``: this iteration's global batch (--rampup-batch-size; default the flag's).
        """
        args = self.args
        batch = batch_size or args.global_batch_size
        self.interval_iters += 1
        self.interval_flops += flops or 0.0
        self.train_history.append(state.iteration, loss_dict)
        # A "nan iteration" is one whose reported loss is inf/nan, counted once per iteration.
        # Megatron counts them among the skipped iterations (an fp16 overflow from a nan loss
        # is skipped); a bf16/fp32 iteration is never skipped, so it is counted here too.
        if any(math.isnan(float(v)) or math.isinf(float(v)) for v in loss_dict.values()):
            self.nan += 1
        if skipped:
            self.skipped += 1
        else:
            for key, value in loss_dict.items():
                self.loss_sums[key] = self.loss_sums.get(key, 0.0) + float(value)
                self.loss_key_counts[key] = self.loss_key_counts.get(key, 0) + 1
            self.loss_counts += 1

        it, samples, tokens = (state.iteration, state.consumed_train_samples,
                               state.consumed_train_tokens)
        if self.writer is not None and it % args.tensorboard_log_interval == 0:
            axes = (it, samples, tokens, layer_tokens)
            if args.log_learning_rate_to_tensorboard:
                self.scalar("learning-rate/learning-rate", lr, *axes)
            if args.log_batch_size_to_tensorboard:
                self.scalar("batch-size/batch-size", batch, *axes)
            for key, value in loss_dict.items():
                self.scalar(f"lm-loss-training/{key}", float(value), *axes)
            if args.fp16 and args.log_loss_scale_to_tensorboard:
                self.scalar("loss-scale/loss-scale", loss_scale, *axes)
            if grad_norm is not None:
                self.scalar("grad-norm/grad-norm", grad_norm, *axes)
            self.writer.add_scalar("steps-vs-samples/y=samples,x=steps", samples, it)
            self.writer.add_scalar("steps-vs-samples/y=steps,x=samples", it, samples)
            self.writer.add_scalar("steps-vs-tokens/y=tokens,x=steps", tokens, it)
            self.writer.add_scalar("steps-vs-tokens/y=steps,x=tokens", it, tokens)
            for tag, (_, value) in (extra or {}).items():
                self.scalar(tag, value, *axes)
            if args.log_memory_to_tensorboard and torch.cuda.is_available():
                self.scalar("mem-max-allocated-bytes", torch.cuda.max_memory_allocated(), it)

        if it % args.log_interval != 0:
            return
        elapsed = time.time() - self.interval_start
        per_iter = elapsed / max(self.interval_iters, 1)
        tokens_per_iter = batch * args.seq_length
        parts = [
            f" iteration {it:8d}/{args.train_iters:8d}",
            f"consumed samples: {samples:12d}",
            f"consumed tokens: {tokens:12d}",
            f"elapsed time per iteration (ms): {per_iter * 1000.0:.1f}",
            f"learning rate: {lr:.3E}",
            f"global batch size: {batch:5d}",
        ]
        for key, total in self.loss_sums.items():
            parts.append(f"{key}: {total / max(self.loss_key_counts.get(key, 0), 1):.6E}")
        parts.append(f"loss scale: {loss_scale:.1f}")
        if grad_norm is not None:
            parts.append(f"grad norm: {grad_norm:.3f}")
        for label, value in (extra or {}).values():
            if label is None:  # TensorBoard only
                continue
            spec = "5d" if isinstance(value, int) else _FLOAT_FORMATS.get(label, ".1f")
            parts.append(f"{label}: {value:{spec}}")
        parts.append(f"number of skipped iterations: {self.skipped:3d}")
        parts.append(f"number of nan iterations: {self.nan:3d}")
        parts.append(f"samples per second: {batch / per_iter:.3f}")
        parts.append(f"tokens per second: {tokens_per_iter / per_iter:.1f}")
        if self.interval_flops:
            tflops = self.interval_flops / elapsed / args.world_size / 1e12
            parts.append(f"TFLOPs: {tflops:.3f}")
        self.log(" | ".join(parts) + " |")
        if self.writer is not None and args.log_timers_to_tensorboard:
            self.scalar("iteration-time/iteration-time", per_iter, it, samples, tokens)
        self._reset()

    def validation(self, prefix, loss_dict, iteration, samples, tokens, layer_tokens=None,
                   test=False):
        """An evaluation's losses: console line, and Megatron-DeepSpeed's TensorBoard tags
        ``lm-loss-validation/<key> validation`` (``... test`` for the test set), with ``ppl``
        and ``vs samples`` / ``vs tokens`` twins."""
        (self.test_history if test else self.valid_history).append(iteration, loss_dict)
        data_type = "test" if test else "validation"
        parts = [f" validation loss at {prefix} | "]
        for key, value in loss_dict.items():
            ppl = math.exp(min(20.0, value))
            parts.append(f"{key} value: {value:.6E} | {key} PPL: {ppl:.6E} | ")
            if self.writer is not None:
                self.scalar(f"lm-loss-validation/{key} {data_type}", value, iteration,
                            samples, tokens, layer_tokens)
                if self.args.log_validation_ppl_to_tensorboard:
                    self.scalar(f"lm-loss-validation/{key} {data_type} ppl", ppl, iteration,
                                samples, tokens, layer_tokens)
        line = "".join(parts)
        self.log("-" * len(line))
        self.log(line)
        self.log("-" * len(line))

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
