"""Layer-token accounting and the LayerToken learning-rate horizons.

Units, precisely:

- **layer tokens**: tokens processed summed over the transformer layers. One sample of length
  ``s`` through ``L`` layers of which ``n`` drop to kept length ``r`` costs
  ``s * (L - n) + r * n`` layer tokens (paper: ``2s + (l-2) b_t`` with the first and last layers
  full). One optimizer step costs ``global_batch * (r * n + s * (L - n))`` (DeepSpeed's
  ``consumed_layer_tokens`` increment). The LM head and attention's quadratic term are not counted.
- **layer-averaged sequence length** (Megatron-DeepSpeed's ``actual_seq_length``):
  ``(s * (L - n) + r * n) // L``; Megatron-DeepSpeed's "tokens" for the LR and stopping are
  ``samples * actual_seq_length`` when random-LTD is on.
- **iterations**: optimizer steps, counted from 0; "layer tokens before step t" is the sum over
  steps 0..t-1.
- **raw tokens**: ``samples * s`` (every sample at full length); ``--lr-warmup-tokens`` and
  ``--train-tokens`` are read in these units when converted to layer tokens (``x L``).

The LayerToken LR (paper, Appendix C) is the ordinary ``OptimizerParamScheduler`` fed consumed
layer tokens as its token counter, with horizons from ``layer_token_lr_horizons``::

    warmup_lt, decay_lt = layer_token_lr_horizons(scheduler=sched, global_batch_size=gbs, ...)
    lr_sched = OptimizerParamScheduler(opt, ..., lr_warmup_steps=0, lr_decay_steps=None,
                                       lr_warmup_tokens=warmup_lt, lr_decay_tokens=decay_lt)
    ... each iteration, after sched.step(gbs):
    lr_sched.step(gbs, token_num=sched.consumed_layer_tokens)

The warmup ends when the consumed layer tokens equal those of the baseline's ``T_warmup``
iterations (``2s T + sum_{t<=T} (l-2) b_t = s l T_warmup``), i.e. ``warmup = GBS * s * l *
T_warmup``; the decay runs to the run's total layer tokens. With nothing dropped (``b_t = s``)
every ratio equals the iteration schedule's, so the LR sequence is the plain one exactly.
"""

from typing import Tuple

import numpy as np

from megatron.errors import UserError


def layer_tokens_per_step(kept, *, num_layers, num_ltd_layers, max_length, global_batch_size=1):
    """DeepSpeed's per-step layer tokens ``gbs * (kept * n_ltd + max * (L - n_ltd))``.

    ``kept`` may be an int or a numpy array of kept lengths (one per step); a kept length at or
    above ``max_length`` counts as ``max_length`` (no dropping).
    """
    r = np.minimum(np.asarray(kept, dtype=np.int64), int(max_length))
    out = int(global_batch_size) * (r * int(num_ltd_layers)
                                    + int(max_length) * (int(num_layers) - int(num_ltd_layers)))
    return int(out) if np.ndim(out) == 0 else out


def layer_averaged_seq_length(kept, *, seq_length, num_layers, num_ltd_layers):
    """Megatron-DeepSpeed's ``actual_seq_length = (s*(L-n) + r*n) // L`` (``s`` when r >= s)."""
    s = int(seq_length)
    r = np.asarray(kept, dtype=np.int64)
    out = np.where(r < s, (s * (int(num_layers) - int(num_ltd_layers)) + r * int(num_ltd_layers))
                   // int(num_layers), s)
    return int(out) if np.ndim(out) == 0 else out


def theoretical_saving(kept, *, seq_length, num_layers, num_ltd_layers=None):
    """LayerToken saving of one step vs. the dense model: ``1 - (s(L-n) + r n) / (L s)``.

    With the default ``n = L - 2`` this is the paper's ``1 - (2s + (l-2) r) / (l s)``.
    """
    n = int(num_layers) - 2 if num_ltd_layers is None else int(num_ltd_layers)
    s, L = float(seq_length), int(num_layers)
    r = np.minimum(np.asarray(kept, dtype=np.float64), s)
    out = 1.0 - (s * (L - n) + r * n) / (L * s)
    return float(out) if np.ndim(out) == 0 else out


def layer_tokens_per_sample_table(scheduler, num_iters, global_batch_size) -> np.ndarray:
    """int64 [num_iters]: layer tokens of one sample at each iteration 0..num_iters-1 (SCTD's
    periodic full-sequence pass included, as ``RandomLTDScheduler.step`` counts it)."""
    kept = scheduler.kept_length_table(num_iters, global_batch_size)
    dropping = np.minimum(kept, scheduler.max_length).sum(axis=1)
    full = scheduler.max_length * (scheduler.num_layers - scheduler.num_ltd_layers)
    out = dropping + full
    interval = getattr(scheduler, "full_pass_interval", None)
    if interval is not None:
        steps = np.arange(int(num_iters), dtype=np.int64)
        dual = ((steps + 1) % interval == 0) & (kept < scheduler.max_length).any(axis=1)
        out = out + np.where(dual, scheduler.max_length * scheduler.num_layers, 0)
    return out


def cumulative_layer_tokens(scheduler, num_iters, global_batch_size) -> np.ndarray:
    """int64 [num_iters + 1]: layer tokens consumed *before* step t (index 0 is 0, the last is
    the run's total), for a fresh run with a constant global batch. Vectorised over steps."""
    per_step = int(global_batch_size) * layer_tokens_per_sample_table(
        scheduler, num_iters, global_batch_size)
    out = np.zeros(int(num_iters) + 1, dtype=np.int64)
    np.cumsum(per_step, out=out[1:])
    return out


def total_layer_tokens(scheduler, num_iters, global_batch_size) -> int:
    """Layer tokens of a whole run of ``num_iters`` steps."""
    return int(cumulative_layer_tokens(scheduler, num_iters, global_batch_size)[-1])


def run_layer_token_saving(scheduler, num_iters, global_batch_size) -> float:
    """1 - (run's layer tokens) / (dense run's layer tokens over the same steps)."""
    dense = int(num_iters) * int(global_batch_size) * scheduler.max_length * scheduler.num_layers
    return 1.0 - total_layer_tokens(scheduler, num_iters, global_batch_size) / dense


def iterations_for_layer_tokens(scheduler, layer_tokens, global_batch_size, max_iters) -> int:
    """Smallest number of steps whose layer tokens reach ``layer_tokens`` (a layer-token budget
    in steps; the paper's ``T_LTwarmup`` for the warmup), searched up to ``max_iters``."""
    cum = cumulative_layer_tokens(scheduler, max_iters, global_batch_size)
    idx = int(np.searchsorted(cum, int(layer_tokens), side="left"))
    if idx > max_iters:
        raise ValueError(f"{layer_tokens} layer tokens are not reached within {max_iters} steps")
    return idx


def _dense_layer_tokens_per_iteration(global_batch_size, seq_length, num_layers):
    return int(global_batch_size) * int(seq_length) * int(num_layers)


def layer_token_lr_horizons(*, global_batch_size, seq_length, num_layers, scheduler=None,
                            train_iters=None, train_samples=None, train_tokens=None,
                            lr_decay_iters=None, lr_decay_samples=None, lr_decay_tokens=None,
                            lr_warmup_iters=None, lr_warmup_samples=None, lr_warmup_tokens=None,
                            lr_warmup_fraction=None, lr_warmup_layer_tokens=None,
                            lr_decay_layer_tokens=None, train_layer_tokens=None
                            ) -> Tuple[int, int]:
    """(warmup_layer_tokens, decay_layer_tokens) for the LayerToken LR.

    Decay horizon, first that applies (as Megatron, an explicit decay flag wins over the run's
    length): ``--lr-decay-layer-tokens``; ``--lr-decay-tokens`` x ``num_layers``; the layer
    tokens of ``--lr-decay-iters`` steps or of ``--lr-decay-samples`` samples computed from
    ``scheduler`` (None: nothing drops); ``--train-layer-tokens``; the layer tokens of
    ``--train-samples`` samples or ``--train-iters`` steps; ``--train-tokens`` x ``num_layers``.
    (Megatron's plain scheduler likewise decays over ``--lr-decay-tokens`` whenever it is given,
    even with ``--train-iters``, as Megatron-DeepSpeed's GPT recipes do.)

    Warmup (at most one source): ``--lr-warmup-layer-tokens``; the baseline's layer tokens of
    ``--lr-warmup-iters`` (``gbs * s * L * T_warmup``), ``--lr-warmup-samples`` (``samples * s *
    L``) or ``--lr-warmup-tokens`` (``tokens * L``); ``--lr-warmup-fraction`` of the decay
    horizon; else 0.
    """
    gbs, s, L = int(global_batch_size), int(seq_length), int(num_layers)
    if gbs <= 0:
        raise UserError(f"--global-batch-size must be positive, got {global_batch_size}")

    def run_layer_tokens(iters):
        if scheduler is None:
            return iters * _dense_layer_tokens_per_iteration(gbs, s, L)
        return total_layer_tokens(scheduler, iters, gbs)

    def samples_layer_tokens(samples):
        """Layer tokens of the first ``samples`` samples (a partial last step counted at that
        step's kept lengths), so that a dense run gives exactly ``samples * s * L``."""
        full, rest = divmod(int(samples), gbs)
        if scheduler is None:
            return int(samples) * s * L
        per_sample = layer_tokens_per_sample_table(scheduler, full + 1, gbs)
        return total_layer_tokens(scheduler, full, gbs) + rest * int(per_sample[full])

    if lr_decay_layer_tokens is not None:
        decay, decay_flag = int(lr_decay_layer_tokens), "--lr-decay-layer-tokens"
    elif lr_decay_tokens:
        decay, decay_flag = int(lr_decay_tokens) * L, "--lr-decay-tokens"
    elif lr_decay_iters:
        decay, decay_flag = run_layer_tokens(int(lr_decay_iters)), "--lr-decay-iters"
    elif lr_decay_samples:
        decay, decay_flag = samples_layer_tokens(lr_decay_samples), "--lr-decay-samples"
    elif train_layer_tokens is not None:
        decay, decay_flag = int(train_layer_tokens), "--train-layer-tokens"
    elif train_samples:  # (a sample-based run also carries its derived train_iters)
        decay, decay_flag = samples_layer_tokens(train_samples), "--train-samples"
    elif train_iters:
        decay, decay_flag = run_layer_tokens(int(train_iters)), "--train-iters"
    elif train_tokens:
        decay, decay_flag = int(train_tokens) * L, "--train-tokens"
    else:
        raise UserError("--layer-token-lr needs a decay horizon: --lr-decay-layer-tokens, "
                        "--train-layer-tokens, --train-iters, --train-samples or --train-tokens")
    if decay <= 0:
        raise UserError(f"LayerToken LR decay horizon ({decay_flag}) must be positive, "
                        f"got {decay} layer tokens")

    sources = {"--lr-warmup-layer-tokens": lr_warmup_layer_tokens,
               "--lr-warmup-iters": lr_warmup_iters or None,
               "--lr-warmup-samples": lr_warmup_samples or None,
               "--lr-warmup-tokens": lr_warmup_tokens,
               "--lr-warmup-fraction": lr_warmup_fraction}
    given = [k for k, v in sources.items() if v is not None]
    if len(given) > 1:
        raise UserError(f"LayerToken LR warmup: give only one of {', '.join(given)}")
    if lr_warmup_layer_tokens is not None:
        warmup = int(lr_warmup_layer_tokens)
    elif lr_warmup_iters:
        warmup = int(lr_warmup_iters) * _dense_layer_tokens_per_iteration(gbs, s, L)
    elif lr_warmup_samples:
        warmup = int(lr_warmup_samples) * s * L
    elif lr_warmup_tokens is not None:
        warmup = int(lr_warmup_tokens) * L
    elif lr_warmup_fraction is not None:
        warmup = int(float(lr_warmup_fraction) * decay)
    else:
        warmup = 0
    if warmup < 0:
        raise UserError(f"LayerToken LR warmup ({given[0]}) must be >= 0, got {warmup}")
    if warmup >= decay:
        raise UserError(f"LayerToken LR warmup ({given[0] if given else 'warmup'}: {warmup} layer "
                        f"tokens) must be smaller than the decay horizon ({decay_flag}: {decay} "
                        f"layer tokens)")
    return warmup, decay


def layer_token_lr_horizons_from_args(args, cfg=None, scheduler=None) -> Tuple[int, int]:
    """``layer_token_lr_horizons`` from Megatron's flags; ``cfg`` (a ``RandomLTDConfig``) wins
    for the layer-token values, since it merges the DeepSpeed JSON."""
    g = lambda name: getattr(args, name, None)  # noqa: E731
    c = lambda name: getattr(cfg, name, None) if cfg is not None else g(name)  # noqa: E731
    return layer_token_lr_horizons(
        global_batch_size=g("global_batch_size"), seq_length=g("seq_length"),
        num_layers=g("num_layers"), scheduler=scheduler, train_iters=g("train_iters"),
        train_samples=g("train_samples"), train_tokens=g("train_tokens"),
        lr_decay_iters=g("lr_decay_iters"), lr_decay_samples=g("lr_decay_samples"),
        lr_decay_tokens=g("lr_decay_tokens"),
        lr_warmup_iters=g("lr_warmup_iters"), lr_warmup_samples=g("lr_warmup_samples"),
        lr_warmup_tokens=g("lr_warmup_tokens"), lr_warmup_fraction=g("lr_warmup_fraction"),
        lr_warmup_layer_tokens=c("lr_warmup_layer_tokens"),
        lr_decay_layer_tokens=c("lr_decay_layer_tokens"),
        train_layer_tokens=c("train_layer_tokens"))
