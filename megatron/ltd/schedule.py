"""Kept-length schedules for random-LTD (MSLG) and the per-run ``RandomLTDScheduler``.

Units, precisely:

- **iteration** (``step``): the optimizer step whose forward is about to run, counted from 0.
  The value for iteration ``t`` is the kept length used by every forward/backward of step ``t``
  (all its micro-batches). This is DeepSpeed's ``global_steps`` at the start of the forward, so the
  first step uses ``t = 0`` and gets ``min_value`` rounded down to a multiple of ``seq_per_step``.
- **consumed tokens**: *raw data tokens* consumed before iteration ``t``, i.e.
  ``consumed_train_samples * seq_length`` (every sample counted at its full length, dropped tokens
  included). This is the paper's token axis ("start 128, +16 every 1.75B tokens, full length after
  210B tokens": 210B / (512 * 2048) = 200,271 steps, matching the 200,000-step recipe). It is NOT
  Megatron-DeepSpeed's layer-averaged ``consumed_train_tokens`` and NOT layer tokens. Token-based
  schedules are evaluated on this count; the scheduler also keeps its own copy (advanced by
  ``step``) and uses it when the caller passes none.
- **layer tokens**: tokens processed summed over layers (see ``megatron.ltd.layer_tokens``);
  ``step(global_batch_size)`` adds ``global_batch_size * sum_l kept_l`` once per optimizer step,
  where non-dropping layers count the full ``max_length``.

A schedule maps (iteration, consumed tokens) to a kept length:

- ``fixed_linear`` (DeepSpeed): ``v = floor(x * (max - min) + min)`` with ``x = step/require_steps``
  (or ``tokens/require_tokens``), then ``v -= v % seq_per_step``, ``v = min(v, max)``;
- ``fixed_root``: the same with ``x ** (1 / root_degree)`` (DeepSpeed's curriculum pacing
  function); degree 2 grows fast early, a degree below 1 (e.g. 0.5, a square) grows slowly early;
- ``constant``: ``min(min_value, max)`` for the whole run (the paper's constant-drop ablation).

All of them are monotone non-decreasing, so DeepSpeed's "once max is reached it is never
recomputed" freeze gives the same values as evaluating the formula directly; the scheduler keeps
the freeze anyway (state ``current_values``) so a resumed run continues bit-identically.
"""

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np

from megatron.errors import UserError

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "constant")


@dataclass(frozen=True)
class KeptLengthSchedule:
    """Kept length of one dropping layer as a function of the iteration or of consumed tokens."""

    schedule_type: str
    """One of ``SCHEDULE_TYPES``."""
    min_value: int
    """Kept length at the start (DeepSpeed ``min_value``; the paper's start, e.g. 128)."""
    max_value: int
    """Full sequence length (``--seq-length``); reaching it means no dropping."""
    seq_per_step: int = 16
    """Granularity: kept lengths are rounded down to a multiple of it (not for ``constant``)."""
    require_steps: Optional[int] = None
    """Iterations over which the kept length grows from min to max (iteration-based)."""
    require_tokens: Optional[int] = None
    """Raw consumed tokens over which it grows (token-based); exclusive with require_steps."""
    root_degree: float = 1.0
    """Root degree of ``fixed_root`` (1 = ``fixed_linear``)."""

    def __post_init__(self):
        if self.schedule_type not in SCHEDULE_TYPES:
            raise ValueError(f"unknown kept-length schedule {self.schedule_type!r}; "
                             f"expected one of {SCHEDULE_TYPES}")
        if not 0 < self.min_value <= self.max_value:
            raise ValueError(f"need 0 < min_value ({self.min_value}) <= max_value "
                             f"({self.max_value})")
        if self.seq_per_step <= 0:
            raise ValueError(f"seq_per_step must be positive, got {self.seq_per_step}")
        if self.schedule_type != "constant":
            if (self.require_steps is None) == (self.require_tokens is None):
                raise ValueError("give exactly one of require_steps and require_tokens")
            horizon = self.require_steps if self.require_tokens is None else self.require_tokens
            if horizon <= 0:
                raise ValueError(f"the schedule horizon must be positive, got {horizon}")
            if not self.root_degree > 0:
                raise ValueError(f"root_degree must be positive, got {self.root_degree}")
            if self.schedule_type == "fixed_linear" and self.root_degree != 1:
                raise ValueError("fixed_linear has root_degree 1; use fixed_root")

    @property
    def unit(self) -> str:
        """'steps' (evaluated on the iteration) or 'tokens' (on raw consumed tokens)."""
        if self.schedule_type == "constant":
            return "steps"
        return "tokens" if self.require_tokens is not None else "steps"

    def value(self, iteration: int, consumed_tokens: Optional[int] = None) -> int:
        """Kept length for the forward of ``iteration`` (DeepSpeed's float arithmetic)."""
        if self.schedule_type == "constant":
            return min(self.min_value, self.max_value)
        if self.unit == "tokens":
            if consumed_tokens is None:
                raise ValueError("a token-based schedule needs consumed_tokens")
            x = float(consumed_tokens) / self.require_tokens
        else:
            x = float(iteration) / self.require_steps
        if self.root_degree != 1:
            x = x ** (1.0 / self.root_degree)
        v = math.floor(x * (self.max_value - self.min_value) + self.min_value)
        v -= v % self.seq_per_step
        return min(v, self.max_value)

    def values(self, iterations, consumed_tokens=None) -> np.ndarray:
        """``value`` over arrays of iterations (and consumed tokens), as int64; no Python loop."""
        iterations = np.asarray(iterations, dtype=np.int64)
        if self.schedule_type == "constant":
            return np.full(iterations.shape, min(self.min_value, self.max_value), np.int64)
        if self.unit == "tokens":
            if consumed_tokens is None:
                raise ValueError("a token-based schedule needs consumed_tokens")
            x = np.asarray(consumed_tokens, dtype=np.float64) / float(self.require_tokens)
        else:
            x = iterations.astype(np.float64) / float(self.require_steps)
        if self.root_degree != 1:
            x = x ** (1.0 / self.root_degree)
        v = np.floor(x * float(self.max_value - self.min_value) + float(self.min_value))
        v = v.astype(np.int64)
        v -= v % self.seq_per_step
        return np.minimum(v, self.max_value)


def linear_layer_starts(first: int, last: int, num: int) -> list:
    """``num`` starts linearly spaced from ``first`` to ``last`` (rounded to the nearest int)."""
    if num == 1:
        return [int(first)]
    return [int(v) for v in np.rint(np.linspace(first, last, num))]


class RandomLTDScheduler:
    """Which layers drop, and to how many tokens, at each iteration; layer-token accounting.

    Typical use in the training loop::

        sched = RandomLTDScheduler.from_config(cfg, num_layers, seq_length)
        for iteration in ...:
            kept = sched.kept_lengths(iteration, consumed_tokens)  # {layer_id: kept}, drops only
            ... forward/backward of all micro-batches with ``kept`` ...
            sched.step(global_batch_size)                          # layer-token accounting

    ``kept_lengths`` may be called once per micro-batch: it is idempotent for one iteration.
    ``step`` accounts the values of the last ``kept_lengths`` call (or evaluates them for the next
    iteration if there was none) and advances the iteration and the raw-token counter.
    """

    def __init__(self, num_layers: int, max_length: int,
                 schedules: Union[KeptLengthSchedule, Mapping[int, KeptLengthSchedule]],
                 layer_ids: Optional[Sequence[int]] = None,
                 full_pass_interval: Optional[int] = None):
        if num_layers <= 0 or max_length <= 0:
            raise ValueError("num_layers and max_length must be positive")
        if layer_ids is None:
            layer_ids = (list(schedules) if isinstance(schedules, Mapping)
                         else list(range(1, num_layers - 1)))
        layer_ids = [int(i) for i in layer_ids]
        if len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"duplicate layer ids in {layer_ids}")
        if any(not 0 <= i < num_layers for i in layer_ids):
            raise ValueError(f"layer ids {layer_ids} out of range [0, {num_layers})")
        if isinstance(schedules, Mapping):
            if sorted(schedules) != sorted(layer_ids):
                raise ValueError("one schedule per dropping layer is required")
            schedules = {i: schedules[i] for i in sorted(layer_ids)}
        else:
            schedules = {i: schedules for i in sorted(layer_ids)}
        for i, s in schedules.items():
            if s.max_value != max_length:
                raise ValueError(f"layer {i}: schedule max_value {s.max_value} != max_length "
                                 f"{max_length}")
        self.num_layers = int(num_layers)
        self.max_length = int(max_length)
        self.layer_ids = tuple(sorted(layer_ids))
        self.schedules: Dict[int, KeptLengthSchedule] = schedules
        self.min_value = min((s.min_value for s in schedules.values()), default=self.max_length)
        self.max_value = self.max_length
        if full_pass_interval is not None and int(full_pass_interval) <= 0:
            raise ValueError(f"full_pass_interval must be positive, got {full_pass_interval}")
        # SCTD: every ``full_pass_interval``-th dropping iteration also runs the full sequence.
        self.full_pass_interval = None if full_pass_interval is None else int(full_pass_interval)
        self.reset()

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg, num_layers: int, seq_length: int) -> "RandomLTDScheduler":
        """Build from a ``RandomLTDConfig``; with ``cfg`` None or disabled nothing drops."""
        if cfg is None or not cfg.enabled:
            return cls(num_layers, seq_length, {}, layer_ids=[])
        if cfg.num_layers != num_layers or cfg.seq_length != seq_length:
            raise UserError(f"random-LTD config is for {cfg.num_layers} layers x seq "
                            f"{cfg.seq_length}, the model has --num-layers {num_layers} x "
                            f"--seq-length {seq_length}")
        starts = cfg.layer_starts or (cfg.start,) * len(cfg.layer_ids)
        schedules = {
            layer: KeptLengthSchedule(
                schedule_type=cfg.schedule, min_value=start, max_value=seq_length,
                seq_per_step=cfg.step, require_steps=cfg.schedule_steps,
                require_tokens=cfg.schedule_tokens, root_degree=cfg.root_degree)
            for layer, start in zip(cfg.layer_ids, starts)}
        interval = cfg.sctd_interval if cfg.method == "sctd" else None
        return cls(num_layers, seq_length, schedules, layer_ids=cfg.layer_ids,
                   full_pass_interval=interval)

    def reset(self):
        """Back to the state before the first iteration (DeepSpeed's ``reset_to_init``)."""
        self.consumed_layer_tokens = 0
        self.consumed_tokens = 0
        self.iteration = 0          # optimizer steps accounted by step()
        self.current_steps = -1     # iteration of the last kept_lengths() evaluation
        self.current_values = {i: s.min_value for i, s in self.schedules.items()}
        self._pending = None        # iteration evaluated by kept_lengths and not yet stepped

    # -- per iteration ---------------------------------------------------------------------------

    @property
    def num_ltd_layers(self) -> int:
        return len(self.layer_ids)

    def kept_lengths(self, iteration: Optional[int] = None,
                     consumed_tokens: Optional[int] = None) -> Dict[int, int]:
        """Kept length per dropping layer for the forward of ``iteration``.

        ``iteration`` defaults to the number of steps accounted so far, ``consumed_tokens`` (raw
        data tokens before this iteration) to the scheduler's own count. Only layers that
        actually drop are returned (kept < max_length); an empty dict means a dense step.
        """
        it = self.iteration if iteration is None else int(iteration)
        tokens = self.consumed_tokens if consumed_tokens is None else int(consumed_tokens)
        for layer, sched in self.schedules.items():
            if self.current_values[layer] < self.max_length:  # frozen once at max
                self.current_values[layer] = sched.value(it, tokens)
        self.current_steps = it
        self._pending = it
        return {i: v for i, v in self.current_values.items() if v < self.max_length}

    def layer_tokens_per_sample(self) -> int:
        """Tokens processed by all layers for one sample at the current kept lengths."""
        dropping = sum(min(v, self.max_length) for v in self.current_values.values())
        return dropping + self.max_length * (self.num_layers - self.num_ltd_layers)

    def runs_full_pass(self, iteration: int) -> bool:
        """SCTD's dual step: with ``full_pass_interval`` F, a dropping iteration t with
        ``(t + 1) % F == 0`` runs the full-sequence pass besides the dropped one."""
        return (self.full_pass_interval is not None
                and (int(iteration) + 1) % self.full_pass_interval == 0)

    def step(self, global_batch_size: int) -> int:
        """Account one optimizer step of ``global_batch_size`` samples; returns its layer tokens.

        DeepSpeed's formula: ``global_batch * (kept * n_ltd + max * (L - n_ltd))`` (summed per
        layer when the layers keep different lengths), plus ``global_batch * s * L`` on an SCTD
        dual step (its full-sequence pass; only steps that drop run one).
        """
        if self._pending is None:
            self.kept_lengths()
        per_sample = self.layer_tokens_per_sample()
        dropping = any(v < self.max_length for v in self.current_values.values())
        if dropping and self.runs_full_pass(self._pending):
            per_sample += self.max_length * self.num_layers
        layer_tokens = int(global_batch_size) * per_sample
        self.consumed_layer_tokens += layer_tokens
        self.consumed_tokens += int(global_batch_size) * self.max_length
        self.iteration = self._pending + 1
        self._pending = None
        return layer_tokens

    @property
    def reserved_length(self):
        """Kept length for logging: the common value, or the mean over dropping layers."""
        if not self.current_values:
            return self.max_length
        vals = [min(v, self.max_length) for v in self.current_values.values()]
        if len(set(vals)) == 1:
            return vals[0]
        return float(np.mean(vals))

    def get_current_seq(self):
        """DeepSpeed's name for ``reserved_length``."""
        return self.reserved_length

    # -- whole-run, vectorised -------------------------------------------------------------------

    def kept_length_table(self, num_iters: int, global_batch_size: int) -> np.ndarray:
        """int64 array [num_iters, n_ltd]: kept length of each dropping layer at iterations
        0..num_iters-1 of a fresh run with a constant global batch (raw tokens before step t =
        t * global_batch_size * max_length). Column order is ``layer_ids``."""
        steps = np.arange(int(num_iters), dtype=np.int64)
        tokens = steps * (int(global_batch_size) * self.max_length)
        cols = [self.schedules[i].values(steps, tokens) for i in self.layer_ids]
        if not cols:
            return np.zeros((len(steps), 0), np.int64)
        return np.stack(cols, axis=1)

    def total_layer_tokens(self, num_iters: int, global_batch_size: int) -> int:
        """Layer tokens of a whole run of ``num_iters`` steps (does not touch the state)."""
        from megatron.ltd.layer_tokens import cumulative_layer_tokens
        return int(cumulative_layer_tokens(self, num_iters, global_batch_size)[-1])

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """DeepSpeed's five keys plus what exact resume of per-layer/token schedules needs."""
        return {
            "consumed_layer_tokens": self.consumed_layer_tokens,
            "current_steps": self.current_steps,
            "current_value": self.reserved_length,
            "min_value": self.min_value,
            "max_value": self.max_value,
            "current_values": dict(self.current_values),
            "iteration": self.iteration,
            "consumed_tokens": self.consumed_tokens,
        }

    def load_state_dict(self, sd: Mapping):
        """Restore; a DeepSpeed ``checkpoint['random_ltd']`` (five keys) is accepted too.

        From a DeepSpeed state the raw consumed-token count is unknown and restarts at 0 (it only
        matters for token-based schedules, which DeepSpeed does not have).
        """
        if self.schedules and "current_values" in sd and not sd["current_values"]:
            raise UserError("the checkpoint was trained without random-LTD, which cannot join a "
                            "run midway: resume it without --random-ltd, or start random-LTD "
                            "from its weights with --finetune")
        if sd["max_value"] != self.max_value:
            raise UserError(f"checkpoint's random-LTD max_value {sd['max_value']} differs from "
                            f"--seq-length {self.max_value}")
        if self.schedules and sd["min_value"] != self.min_value:
            raise UserError(f"checkpoint's random-LTD min_value {sd['min_value']} differs from "
                            f"--random-ltd-start {self.min_value}")
        self.consumed_layer_tokens = int(sd["consumed_layer_tokens"])
        self.current_steps = int(sd["current_steps"])
        if "current_values" in sd:
            values = {int(k): int(v) for k, v in sd["current_values"].items()}
            if not self.schedules:
                values = {}  # a dense run continuing a random-LTD one: dropping ends here
            elif sorted(values) != list(self.layer_ids):
                raise UserError(f"checkpoint's random-LTD layers {sorted(values)} differ from "
                                f"--random-ltd-layer-ids {list(self.layer_ids)}")
            self.current_values = values
        else:
            self.current_values = {i: int(sd["current_value"]) for i in self.layer_ids}
        self.iteration = int(sd.get("iteration", self.current_steps + 1))
        self.consumed_tokens = int(sd.get("consumed_tokens", 0))
        self._pending = None
