"""Megatron-LM's growing global batch: ``--rampup-batch-size START INCREMENT SAMPLES`` (older
scripts) and ``--step-batch-size-schedule "0:BS0 T1:BS1 ..."`` (newer Megatron-LM).

- Ramp-up, as Megatron's ``RampupBatchsizeNumMicroBatches``: the batch starts at START and grows
  by INCREMENT every SAMPLES / ((--global-batch-size - START) / INCREMENT) consumed samples,
  reaching --global-batch-size once more than SAMPLES samples have been consumed. With
  --train-samples the iteration count is Megatron's ``update_train_iters``.
- Step schedule, as Megatron's ``StepBatchsizeNumMicroBatchesCalculator``: space- or
  comma-separated ``THRESHOLD:BATCH`` pairs, thresholds in tokens (K/M/B/T suffixes; converted to
  samples by ``// --seq-length``), the first at 0, strictly increasing; the batch is that of the
  last threshold reached; --global-batch-size is the schedule's final batch (giving another value
  is refused); sample-based runs only (--train-samples), whose steps run while a whole batch
  fits.

Either way the batch is a function of the consumed samples alone, so a resumed run continues at
the same size. Each step runs ``batch // (micro-batch x DP)`` micro-batches; consumed samples,
consumed tokens, the LR schedule (which Megatron steps in samples) and random-LTD's layer-token
count advance by the step's own batch (``megatron.training``).
"""

import functools
from dataclasses import dataclass
from typing import Tuple

from megatron.errors import UserError

FLAG = "--rampup-batch-size"
STEP_FLAG = "--step-batch-size-schedule"
_SUFFIXES = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}


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


@dataclass(frozen=True)
class StepBatchSchedule:
    steps: Tuple[Tuple[int, int], ...]
    """(threshold in consumed samples, global batch from there on), thresholds ascending from 0."""

    @property
    def final(self) -> int:
        return self.steps[-1][1]

    def batch_size(self, consumed_samples: int) -> int:
        """The batch of the last threshold that ``consumed_samples`` has reached."""
        return next(batch for threshold, batch in reversed(self.steps)
                    if consumed_samples >= threshold)

    def iterations_for_samples(self, train_samples: int) -> int:
        """Steps while a whole batch still fits in --train-samples, counted per segment."""
        iterations, consumed = 0, 0
        for i, (_, batch) in enumerate(self.steps):
            fit = (train_samples - consumed) // batch  # whole batches left at this size
            if i + 1 == len(self.steps):
                return iterations + fit
            needed = max(-(-(self.steps[i + 1][0] - consumed) // batch), 0)  # to the next
            if fit < needed:  # the run ends inside this segment
                return iterations + fit
            iterations, consumed = iterations + needed, consumed + needed * batch
        return iterations


def _number(text, where):
    """'250B' -> 250_000_000_000 (Megatron's K/M/B/T suffixes)."""
    value, mult = text.strip().upper(), 1
    if value[-1:] in _SUFFIXES:
        value, mult = value[:-1], _SUFFIXES[value[-1]]
    try:
        return int(float(value) * mult)
    except ValueError:
        raise UserError(f"{STEP_FLAG}: {where!r} is not THRESHOLD:BATCH (numbers with an "
                        "optional K/M/B/T suffix)") from None


@functools.lru_cache(maxsize=8)
def parse_step_schedule(text: str, seq_length: int) -> StepBatchSchedule:
    """The schedule of ``--step-batch-size-schedule`` (thresholds in tokens -> samples)."""
    steps = []
    for entry in text.replace(",", " ").split():
        if ":" not in entry:
            raise UserError(f"{STEP_FLAG}: {entry!r} is not THRESHOLD:BATCH")
        threshold, batch = entry.split(":", 1)
        steps.append((_number(threshold, entry) // seq_length, _number(batch, entry)))
    steps.sort()
    if not steps or steps[0][0] != 0:
        raise UserError(f"{STEP_FLAG} {text!r}: the first threshold must be 0")
    for (a, _), (b, _) in zip(steps, steps[1:]):
        if b <= a:
            raise UserError(f"{STEP_FLAG} {text!r}: thresholds must be strictly increasing in "
                            f"samples (tokens // --seq-length {seq_length})")
    if any(batch <= 0 for _, batch in steps):
        raise UserError(f"{STEP_FLAG} {text!r}: batch sizes must be positive")
    return StepBatchSchedule(tuple(steps))


def step_schedule_global_batch(args):
    """--step-batch-size-schedule decides --global-batch-size (its final batch); call before
    the batch-size checks."""
    text = getattr(args, "step_batch_size_schedule", None)
    if text is None:
        return
    final = parse_step_schedule(text, args.seq_length).final
    if args.global_batch_size not in (None, final):
        raise UserError(f"--global-batch-size {args.global_batch_size} contradicts {STEP_FLAG} "
                        f"{text!r}, whose final batch is {final} (leave --global-batch-size out)")
    args.global_batch_size = final


def parse_rampup(args):
    """Validate --rampup-batch-size (a list of three words) or --step-batch-size-schedule
    against the batch and training-length flags; stores the ramp's three integers on ``args``.
    Returns the schedule (None without either flag)."""
    if getattr(args, "step_batch_size_schedule", None) is not None:
        return _check_step_schedule(args)
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
    _refuse_constant_batch_options(args, FLAG)
    return BatchSizeRampup(start, increment, samples, gbs)


def _check_step_schedule(args):
    text = args.step_batch_size_schedule
    if args.rampup_batch_size is not None:
        raise UserError(f"{STEP_FLAG} and {FLAG} are mutually exclusive")
    if args.train_samples is None:
        raise UserError(f"{STEP_FLAG} is for sample-based runs: give --train-samples (not "
                        "--train-iters or a token budget alone)")
    _refuse_constant_batch_options(args, STEP_FLAG)
    # Divisibility of each batch is checked when it is reached (current_global_batch_size), as
    # Megatron: early entries may not divide a layout a run was resumed with.
    return parse_step_schedule(text, args.seq_length)


def _refuse_constant_batch_options(args, flag):
    if getattr(args, "train_layer_tokens", None) is not None or getattr(args, "layer_token_lr",
                                                                        False):
        raise UserError(f"{flag} cannot be combined with --train-layer-tokens/--layer-token-lr "
                        "yet (their horizons assume a constant global batch)")


def _schedule(args):
    """The run's batch schedule, or None for a constant --global-batch-size."""
    if getattr(args, "step_batch_size_schedule", None) is not None:
        return parse_step_schedule(args.step_batch_size_schedule, args.seq_length)
    if getattr(args, "rampup_batch_size", None) is not None:
        start, increment, samples = args.rampup_batch_size
        return BatchSizeRampup(start, increment, samples, args.global_batch_size)
    return None


def current_global_batch_size(args, consumed_samples: int) -> int:
    """This step's global batch: the schedule's (--rampup-batch-size /
    --step-batch-size-schedule) or --global-batch-size."""
    schedule = _schedule(args)
    if schedule is None:
        return args.global_batch_size
    batch = schedule.batch_size(consumed_samples)
    unit = args.micro_batch_size * args.data_parallel_size
    if batch % unit:
        raise UserError(f"{STEP_FLAG}: the batch {batch} reached after {consumed_samples} "
                        f"samples is not a multiple of --micro-batch-size {args.micro_batch_size}"
                        f" x data-parallel size {args.data_parallel_size}")
    return batch


def train_iters_for_samples(args, train_samples: int) -> int:
    """Iterations of a --train-samples run (Megatron's update_train_iters)."""
    schedule = _schedule(args)
    if schedule is None:
        return train_samples // args.global_batch_size
    return schedule.iterations_for_samples(train_samples)


__all__ = ["BatchSizeRampup", "StepBatchSchedule", "current_global_batch_size",
           "parse_rampup", "parse_step_schedule", "step_schedule_global_batch",
           "train_iters_for_samples"]
