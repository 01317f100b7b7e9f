"""Learning-rate and weight-decay schedules (Megatron-DeepSpeed's OptimizerParamScheduler).

Units. A scheduler "step" is one *sample*: the training loop calls
``step(increment=global_batch_size, token_num=consumed_tokens)`` once per iteration, so
``--lr-warmup-iters N`` becomes ``N * global_batch_size`` steps. The second counter, "tokens", is
abstract: it is whatever monotone quantity the loop passes as ``token_num`` -- consumed tokens
(Megatron-DeepSpeed; layer-averaged when random-LTD is on) or consumed *layer tokens* (the LayerToken
LR schedule). The math below never looks inside it.

Rules, as in Megatron-DeepSpeed:
- warmup is token-based when ``lr_warmup_tokens`` is set, otherwise step-based; it is linear from
  ``init_lr`` to ``max_lr``;
- decay is token-based when ``lr_decay_tokens`` is set, otherwise step-based; when decay is
  token-based and warmup step-based, the token count at the end of the step warmup becomes the
  start of the token decay;
- past the decay horizon the LR is ``min_lr``; styles: constant, linear, cosine,
  inverse-square-root;
- weight decay moves from ``start_wd`` to ``end_wd`` over ``wd_incr_steps`` (constant, linear,
  cosine).
"""

import math
from dataclasses import dataclass
from typing import Optional

from megatron.errors import UserError

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Anneals the learning rate and the weight decay of every param group of ``optimizer``.

    Each group gets ``lr = lr_now * group.get('lr_mult', 1)`` and, if it has a ``weight_decay``
    entry, ``weight_decay = wd_now * group.get('wd_mult', 1)``.
    """

    def __init__(self, optimizer, *, max_lr, min_lr, lr_warmup_steps, lr_decay_steps,
                 lr_decay_style, start_wd, end_wd, wd_incr_steps, wd_incr_style, init_lr=0.0,
                 lr_warmup_tokens=None, lr_decay_tokens=None,
                 use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=False,
                 log=None):
        self.optimizer = optimizer
        self.log = log or (lambda msg: None)

        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        if self.min_lr < 0.0:
            raise UserError(f"--min-lr must be >= 0, got {min_lr}")
        if self.max_lr < self.min_lr:
            raise UserError(f"--lr ({max_lr}) must be >= --min-lr ({min_lr})")
        if self.init_lr < 0.0 or self.init_lr > self.max_lr:
            raise UserError(f"--lr-warmup-init ({init_lr}) must be in [0, --lr ({max_lr})]")
        if lr_decay_style not in LR_DECAY_STYLES:
            raise UserError(f"--lr-decay-style must be one of {', '.join(LR_DECAY_STYLES)}, "
                            f"got {lr_decay_style!r}")
        if wd_incr_style not in WD_INCR_STYLES:
            raise UserError(f"--weight-decay-incr-style must be one of "
                            f"{', '.join(WD_INCR_STYLES)}, got {wd_incr_style!r}")

        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_warmup_tokens = lr_warmup_tokens
        self.lr_decay_tokens = lr_decay_tokens
        self.lr_decay_style = lr_decay_style
        # Token decay after a step warmup: the warmup's end in tokens is learned at run time
        # (captured by step() when the step warmup ends) and saved as lr_warmup_tokens.
        self._captures_warmup_tokens = lr_decay_tokens is not None and lr_warmup_tokens is None
        if lr_decay_steps is None and lr_decay_tokens is None:
            raise UserError("no LR decay horizon: give --lr-decay-iters/--lr-decay-samples/"
                            "--lr-decay-tokens or --train-iters/--train-samples/--train-tokens")
        if lr_decay_steps is not None:
            if not lr_decay_steps > 0:
                raise UserError(f"LR decay horizon must be positive, got {lr_decay_steps} samples "
                                f"(--lr-decay-iters/--lr-decay-samples)")
            if not lr_warmup_steps < lr_decay_steps:
                raise UserError(f"LR warmup ({lr_warmup_steps} samples) must be shorter than the "
                                f"decay ({lr_decay_steps} samples): check --lr-warmup-iters/"
                                f"--lr-warmup-samples/--lr-warmup-fraction")
        if lr_decay_tokens is not None and lr_warmup_tokens is not None:
            if not lr_warmup_tokens < lr_decay_tokens:
                raise UserError(f"--lr-warmup-tokens ({lr_warmup_tokens}) must be smaller than "
                                f"--lr-decay-tokens ({lr_decay_tokens})")

        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        if self.start_wd < 0.0:
            raise UserError(f"--start-weight-decay must be >= 0, got {start_wd}")
        if self.end_wd < self.start_wd:
            raise UserError(f"--end-weight-decay ({end_wd}) must be >= --start-weight-decay "
                            f"({start_wd})")
        if wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise UserError("--weight-decay-incr-style constant needs --start-weight-decay == "
                            "--end-weight-decay")
        if wd_incr_style != "constant" and not (wd_incr_steps and wd_incr_steps > 0):
            raise UserError(f"--weight-decay-incr-style {wd_incr_style} needs --train-iters or "
                            f"--train-samples (the weight-decay horizon)")
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style

        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise UserError("--override-opt_param-scheduler and "
                            "--use-checkpoint-opt_param-scheduler are mutually exclusive")
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler

        self.num_steps = 0
        self.num_tokens = 0
        self.step(0, token_num=0)
        self.log(f"> learning rate decay style: {self.lr_decay_style}")

    # -- schedules -------------------------------------------------------------------------------

    def get_wd(self):
        """Weight decay at the current step."""
        if self.wd_incr_style == "constant" or self.num_steps > self.wd_incr_steps:
            return self.end_wd
        ratio = float(self.num_steps) / float(self.wd_incr_steps)
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self):
        """Learning rate at the current (steps, tokens)."""
        warmup_tokens = self.lr_warmup_tokens
        if warmup_tokens is None:
            if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
                frac = float(self.num_steps) / float(self.lr_warmup_steps)
                return self.init_lr + (self.max_lr - self.init_lr) * frac
        elif warmup_tokens > 0 and self.num_tokens <= warmup_tokens:
            frac = float(self.num_tokens) / float(warmup_tokens)
            return self.init_lr + (self.max_lr - self.init_lr) * frac

        if self.lr_decay_style == "constant":
            return self.max_lr

        if self.lr_decay_tokens is None:
            if self.num_steps > self.lr_decay_steps:
                return self.min_lr
        elif self.num_tokens > self.lr_decay_tokens:
            return self.min_lr

        if self.lr_decay_style == "inverse-square-root":
            if warmup_tokens is None:
                ratio = max(self.lr_warmup_steps, 1) / max(self.num_steps, 1)
            else:
                ratio = max(warmup_tokens, 1) / max(self.num_tokens, 1)
            return max(self.min_lr, self.max_lr * ratio ** 0.5)

        if self.lr_decay_tokens is None:
            done = self.num_steps - self.lr_warmup_steps
            span = self.lr_decay_steps - self.lr_warmup_steps
        else:
            start = warmup_tokens or 0
            done = self.num_tokens - start
            span = self.lr_decay_tokens - start
        decay_ratio = float(done) / float(span)
        assert 0.0 <= decay_ratio <= 1.0, decay_ratio
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment, token_num=None):
        """Advance by ``increment`` steps (samples); ``token_num`` is the new token count.

        Without ``token_num`` the token counter stays where it is.
        """
        self.num_steps += increment
        if token_num is not None:
            self.num_tokens = token_num
        if (self._captures_warmup_tokens and self.lr_warmup_tokens is None
                and self.num_steps >= self.lr_warmup_steps):
            self.lr_warmup_tokens = self.num_tokens
        new_lr = self.get_lr()
        new_wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr * group.get("lr_mult", 1.0)
            if "weight_decay" in group:
                group["weight_decay"] = new_wd * group.get("wd_mult", 1.0)
        return new_lr

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self):
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_steps": self.lr_decay_steps,
            "lr_decay_style": self.lr_decay_style,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
            "num_tokens": self.num_tokens,
            "lr_warmup_tokens": self.lr_warmup_tokens,
            "lr_decay_tokens": self.lr_decay_tokens,
        }

    def _check_and_set(self, cls_value, sd_value, name):
        """Reconcile a value from the flags with the checkpoint's (Megatron's rules)."""
        if self.override_opt_param_scheduler:
            self.log(f" > overriding {name} value to {cls_value}")
            return cls_value
        if not self.use_checkpoint_opt_param_scheduler and cls_value != sd_value:
            raise UserError(
                f"LR scheduler {name}: the flags give {cls_value} but the checkpoint has "
                f"{sd_value}; pass --override-opt_param-scheduler to use the flags or "
                f"--use-checkpoint-opt_param-scheduler to use the checkpoint")
        self.log(f" > using checkpoint value {sd_value} for {name}")
        return sd_value

    @staticmethod
    def _first(sd, *keys, default=None):
        for key in keys:
            if key in sd:
                return sd[key]
        return default

    def load_state_dict(self, sd):
        """Restore from a Megatron(-DeepSpeed) scheduler state (older key names accepted)."""
        self.max_lr = self._check_and_set(
            self.max_lr, self._first(sd, "max_lr", "start_lr"), "learning rate")
        self.min_lr = self._check_and_set(self.min_lr, sd["min_lr"], "minimum learning rate")
        self.lr_warmup_steps = self._check_and_set(
            self.lr_warmup_steps,
            self._first(sd, "lr_warmup_steps", "warmup_steps", "warmup_iter"),
            "warmup iterations")
        self.lr_decay_steps = self._check_and_set(
            self.lr_decay_steps, self._first(sd, "lr_decay_steps", "decay_steps", "end_iter"),
            "total number of iterations")
        self.lr_decay_style = self._check_and_set(
            self.lr_decay_style, self._first(sd, "lr_decay_style", "decay_style"),
            "learning rate decay style")
        self.lr_decay_tokens = self._check_and_set(
            self.lr_decay_tokens, self._first(sd, "lr_decay_tokens", "decay_tokens"),
            "decay tokens")
        sd_warmup_tokens = self._first(sd, "lr_warmup_tokens", "warmup_tokens")
        if self._captures_warmup_tokens and self.lr_decay_tokens is not None:
            # Step warmup + token decay: the checkpoint's value is the run-time capture, not a
            # flag, so it is state to restore rather than a value to check.
            self.lr_warmup_tokens = sd_warmup_tokens
        else:
            self.lr_warmup_tokens = self._check_and_set(
                self.lr_warmup_tokens, sd_warmup_tokens, "warmup tokens")

        if "start_wd" in sd:
            self.start_wd = self._check_and_set(self.start_wd, sd["start_wd"],
                                                "start weight decay")
            self.end_wd = self._check_and_set(self.end_wd, sd["end_wd"], "end weight decay")
            self.wd_incr_steps = self._check_and_set(
                self.wd_incr_steps, sd["wd_incr_steps"],
                "total number of weight decay iterations")
            self.wd_incr_style = self._check_and_set(
                self.wd_incr_style, sd["wd_incr_style"], "weight decay incr style")

        self.num_steps = self._first(sd, "num_steps", "num_iters")
        self.num_tokens = sd.get("num_tokens", self.num_tokens)
        self.step(0)


@dataclass(frozen=True)
class ScheduleSteps:
    """Scheduler horizons in scheduler units (steps = samples; tokens = the token counter)."""

    lr_warmup_steps: float
    lr_decay_steps: Optional[float]
    wd_incr_steps: Optional[int]
    lr_warmup_tokens: Optional[int]
    lr_decay_tokens: Optional[int]


_STEP_FLAGS = ("global_batch_size", "train_iters", "train_samples", "train_tokens",
               "lr_decay_iters", "lr_decay_samples", "lr_decay_tokens", "lr_warmup_fraction",
               "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_tokens")


def scheduler_steps_from_args(args=None, *, global_batch_size=None, train_iters=None,
                              train_samples=None,
                              train_tokens=None, lr_decay_iters=None, lr_decay_samples=None,
                              lr_decay_tokens=None, lr_warmup_fraction=None, lr_warmup_iters=0,
                              lr_warmup_samples=0, lr_warmup_tokens=None):
    """Turn Megatron's iteration-, sample- and token-based LR flags into scheduler horizons.

    - iteration-based (``--train-iters``): decay = (lr_decay_iters or train_iters) * GBS samples,
      warmup = lr_warmup_fraction * decay or lr_warmup_iters * GBS, wd horizon = train_iters * GBS;
    - sample-based (``--train-samples``): decay = lr_decay_samples or train_samples, warmup =
      fraction * decay or lr_warmup_samples, wd horizon = train_samples;
    - tokens: ``--lr-warmup-tokens`` / ``--lr-decay-tokens`` pass through; with neither
      --train-iters nor --train-samples, ``--train-tokens`` is the decay horizon and
      ``--lr-warmup-fraction`` is a fraction of it.

    Pass the flags as keywords, or a config ``args`` with Megatron's attribute names.
    """
    if args is not None:
        flags = {k: getattr(args, k) for k in _STEP_FLAGS if getattr(args, k, None) is not None}
        if "train_iters" in flags and "train_samples" in flags:
            # The config rejects both from the user, so one was derived from the other for the
            # loop (Megatron's update_train_iters sets train_iters in a sample-based run).
            del flags["train_iters"]
        return scheduler_steps_from_args(**flags)
    lr_warmup_iters = lr_warmup_iters or 0
    lr_warmup_samples = lr_warmup_samples or 0
    if train_iters and train_samples:
        raise UserError("--train-iters and --train-samples are mutually exclusive")
    if lr_warmup_fraction is not None:
        if lr_warmup_iters or lr_warmup_samples:
            raise UserError("--lr-warmup-fraction cannot be combined with --lr-warmup-iters or "
                            "--lr-warmup-samples")
        if not 0.0 <= lr_warmup_fraction < 1.0:
            raise UserError(f"--lr-warmup-fraction must be in [0, 1), got {lr_warmup_fraction}")
    if lr_warmup_tokens is not None and (lr_warmup_fraction is not None or lr_warmup_iters
                                         or lr_warmup_samples):
        raise UserError("--lr-warmup-tokens cannot be combined with --lr-warmup-fraction, "
                        "--lr-warmup-iters or --lr-warmup-samples")
    if global_batch_size is None or global_batch_size <= 0:
        raise UserError(f"--global-batch-size must be positive, got {global_batch_size}")

    wd_incr_steps = None
    if train_iters:
        if lr_decay_samples is not None or lr_warmup_samples:
            raise UserError("with --train-iters use --lr-decay-iters/--lr-warmup-iters, not "
                            "--lr-decay-samples/--lr-warmup-samples")
        lr_decay_steps = (lr_decay_iters or train_iters) * global_batch_size
        wd_incr_steps = train_iters * global_batch_size
        if lr_warmup_fraction is not None:
            lr_warmup_steps = lr_warmup_fraction * lr_decay_steps
        else:
            lr_warmup_steps = lr_warmup_iters * global_batch_size
        decay_flag, warmup_flag = "--lr-decay-iters/--train-iters", (
            "--lr-warmup-fraction" if lr_warmup_fraction is not None else "--lr-warmup-iters")
    elif train_samples:
        if lr_decay_iters is not None or lr_warmup_iters:
            raise UserError("with --train-samples use --lr-decay-samples/--lr-warmup-samples, "
                            "not --lr-decay-iters/--lr-warmup-iters")
        lr_decay_steps = lr_decay_samples or train_samples
        wd_incr_steps = train_samples
        if lr_warmup_fraction is not None:
            lr_warmup_steps = lr_warmup_fraction * lr_decay_steps
        else:
            lr_warmup_steps = lr_warmup_samples
        decay_flag, warmup_flag = "--lr-decay-samples/--train-samples", (
            "--lr-warmup-fraction" if lr_warmup_fraction is not None else "--lr-warmup-samples")
    elif lr_decay_iters or lr_decay_samples:
        raise UserError("--lr-decay-iters/--lr-decay-samples need --train-iters/--train-samples")
    else:
        # Token-only run: no sample horizon.
        if lr_decay_tokens is None:
            if not train_tokens:
                raise UserError("one of --train-iters, --train-samples or --train-tokens "
                                "is required")
            lr_decay_tokens = train_tokens
        lr_decay_steps = None
        lr_warmup_steps = lr_warmup_iters * global_batch_size + lr_warmup_samples
        if lr_warmup_fraction is not None:
            lr_warmup_tokens = int(lr_warmup_fraction * lr_decay_tokens)
        decay_flag = warmup_flag = None

    if lr_decay_steps is not None:
        if lr_decay_steps <= 0:
            raise UserError(f"LR decay horizon must be positive ({decay_flag}), got "
                            f"{lr_decay_steps} samples")
        if lr_warmup_steps >= lr_decay_steps:
            raise UserError(f"LR warmup ({warmup_flag}: {lr_warmup_steps} samples) must be "
                            f"shorter than the decay ({decay_flag}: {lr_decay_steps} samples)")
    if lr_decay_tokens is not None:
        if lr_decay_tokens <= 0:
            raise UserError(f"--lr-decay-tokens must be positive, got {lr_decay_tokens}")
        if lr_warmup_tokens is not None and lr_warmup_tokens >= lr_decay_tokens:
            raise UserError(f"--lr-warmup-tokens ({lr_warmup_tokens}) must be smaller than "
                            f"--lr-decay-tokens ({lr_decay_tokens})")
    return ScheduleSteps(lr_warmup_steps=lr_warmup_steps, lr_decay_steps=lr_decay_steps,
                         wd_incr_steps=wd_incr_steps, lr_warmup_tokens=lr_warmup_tokens,
                         lr_decay_tokens=lr_decay_tokens)


def scheduler_from_args(optimizer, args, log=None):
    """Build the scheduler from a config with Megatron's attribute names (``args.lr`` ...)."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    steps = scheduler_steps_from_args(args)
    if g("lr") is None:
        raise UserError("--lr is required")
    weight_decay = g("weight_decay", 0.01)
    start_wd = g("start_weight_decay")
    end_wd = g("end_weight_decay")
    return OptimizerParamScheduler(
        optimizer, max_lr=g("lr"), min_lr=g("min_lr", 0.0), init_lr=g("lr_warmup_init", 0.0),
        lr_warmup_steps=steps.lr_warmup_steps, lr_decay_steps=steps.lr_decay_steps,
        lr_decay_style=g("lr_decay_style", "linear"),
        lr_warmup_tokens=steps.lr_warmup_tokens, lr_decay_tokens=steps.lr_decay_tokens,
        start_wd=weight_decay if start_wd is None else start_wd,
        end_wd=weight_decay if end_wd is None else end_wd,
        wd_incr_steps=steps.wd_incr_steps,
        wd_incr_style=g("weight_decay_incr_style", "constant"),
        use_checkpoint_opt_param_scheduler=bool(g("use_checkpoint_opt_param_scheduler", False)),
        override_opt_param_scheduler=bool(g("override_opt_param_scheduler", False)),
        log=log)
