"""Megatron-LM's ``--rampup-batch-size START INCREMENT SAMPLES``: the global batch grows while
training starts.

As Megatron's ``RampupBatchsizeNumMicroBatches``: the global batch starts at START and grows by
INCREMENT every SAMPLES / ((--global-batch-size - START) / INCREMENT) consumed samples, reaching
--global-batch-size once more than SAMPLES samples have been consumed. The batch is a function of
the consumed samples alone, so a resumed run continues at the same size. Each step runs
``batch // (micro-batch x DP)`` micro-batches; consumed samples, consumed tokens, the LR schedule
(which Megatron steps in samples) and random-LTD's layer-token count advance by the step's own
batch. With --train-samples the iteration count is Megatron's ``update_train_iters``.
"""

from dataclasses import dataclass

from megatron.errors import UserError

FLAG = "--rampup-batch-size"


@dataclass(frozen=True)
class BatchSizeRampup:
    start: int
    """Global batch of the first step (START)."""
    increment: int
    """Samples added to the global batch at each growth (INCREMENT)."""
    samples: int
    """Consumed samples over which the batch grows to ``final`` (SAMPLES)."""
    final: int
    """--global-batch-size, reached after ``samples``."""

    @property
    def samples_per_increment(self) -> float:
        return self.samples / ((self.final - self.start) // self.increment)

    def batch_size(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after ``consumed_samples`` samples."""
        if consumed_samples > self.samples or self.start == self.final:
            return self.final
        steps = int(consumed_samples / self.samples_per_increment)
        return self.start + steps * self.increment

    def iterations_for_samples(self, train_samples: int) -> int:
        """Megatron's update_train_iters: the ramp's steps (while the consumed samples are at
        most SAMPLES), then whole steps of the final batch (a partial last batch dropped)."""
        iterations, consumed = 0, 0
        while consumed <= self.samples:
            consumed += self.batch_size(consumed)
            iterations += 1
        return iterations + max(train_samples - consumed, 0) // self.final


def parse_rampup(args):
    """Validate --rampup-batch-size (a list of three words) against the batch flags; stores the
    three integers on ``args`` and returns the ``BatchSizeRampup`` (None without the flag)."""
    values = args.rampup_batch_size
    if values is None:
        return None
    try:
        start, increment, samples = (int(v) for v in values)
    except ValueError:
        raise UserError(f"{FLAG} expects three integers START INCREMENT SAMPLES, got "
                        f"{' '.join(map(str, values)) or 'nothing'}") from None
    args.rampup_batch_size = [start, increment, samples]
    unit = args.micro_batch_size * args.data_parallel_size
    gbs = args.global_batch_size
    if not 0 < start <= gbs:
        raise UserError(f"{FLAG}: START {start} must be in 1 .. --global-batch-size {gbs}")
    if start < gbs and (increment <= 0 or (gbs - start) % increment):
        raise UserError(f"{FLAG}: INCREMENT {increment} must be positive and divide "
                        f"--global-batch-size {gbs} - START {start}")
    if samples < 0:
        raise UserError(f"{FLAG}: SAMPLES {samples} must be >= 0")
    for name, value in (("START", start), ("INCREMENT", increment)):
        if value % unit:
            raise UserError(f"{FLAG}: {name} {value} is not a multiple of --micro-batch-size "
                            f"{args.micro_batch_size} x data-parallel size "
                            f"{args.data_parallel_size}, so some steps' batches would not split "
                            f"into whole micro-batches")
    if args.train_iters is None and args.train_samples is None:
        raise UserError(f"{FLAG} needs --train-iters or --train-samples (a token budget alone "
                        f"gives no iteration bound while the batch grows)")
    if getattr(args, "train_layer_tokens", None) is not None or getattr(args, "layer_token_lr",
                                                                        False):
        raise UserError(f"{FLAG} cannot be combined with --train-layer-tokens/--layer-token-lr "
                        "yet (their horizons assume a constant global batch)")
    return BatchSizeRampup(start, increment, samples, gbs)


def current_global_batch_size(args, consumed_samples: int) -> int:
    """This step's global batch: the ramp's (--rampup-batch-size) or --global-batch-size."""
    if getattr(args, "rampup_batch_size", None) is None:
        return args.global_batch_size
    start, increment, samples = args.rampup_batch_size
    return BatchSizeRampup(start, increment, samples, args.global_batch_size).batch_size(
        consumed_samples)


def train_iters_for_samples(args, train_samples: int) -> int:
    """Iterations of a --train-samples run (Megatron's update_train_iters)."""
    if getattr(args, "rampup_batch_size", None) is None:
        return train_samples // args.global_batch_size
    start, increment, samples = args.rampup_batch_size
    return BatchSizeRampup(start, increment, samples,
                           args.global_batch_size).iterations_for_samples(train_samples)


__all__ = ["BatchSizeRampup", "current_global_batch_size", "parse_rampup",
           "train_iters_for_samples"]
