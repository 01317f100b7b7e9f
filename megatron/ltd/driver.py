"""The training loop's view of random-LTD: per-iteration kept lengths and layer-token accounting.

Units (see schedule.py): the kept-length schedule runs on the iteration (or on raw consumed
tokens for token-based schedules); *layer tokens* are tokens summed over all layers; the
*effective sequence length* is Megatron-DeepSpeed's layer-averaged length
``(s*(L-n) + r*n) // L``, which is what Megatron-DeepSpeed adds to "consumed tokens" (and so to
``--train-tokens`` and token-based LR) when random-LTD is on. A baseline run (random-LTD off)
still counts layer tokens (``s * L`` per sample) so that the two compare at equal compute.
"""

import math
from functools import partial

from megatron.ltd.dropping import TokenDropState
from megatron.ltd.layer_tokens import iterations_for_layer_tokens
from megatron.ltd.schedule import RandomLTDScheduler


class TokenDroppingDriver:
    """Owns the ``RandomLTDScheduler`` of a run; one ``begin``/``end`` pair per iteration."""

    def __init__(self, cfg, *, num_layers, seq_length, global_batch_size, seed):
        self.cfg = cfg
        self.enabled = cfg is not None and cfg.enabled
        self.num_layers = num_layers
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.scheduler = RandomLTDScheduler.from_config(cfg if self.enabled else None,
                                                        num_layers, seq_length)
        self._kept = {}

    # -- per iteration ---------------------------------------------------------------------------
    def begin_iteration(self, iteration):
        """Kept lengths for this iteration's forward; returns the ``token_drop`` callable
        (micro-batch sample ids -> TokenDropState) or None for a dense step."""
        self._kept = self.scheduler.kept_lengths(iteration) if self.enabled else {}
        if not self._kept:
            return None
        return partial(TokenDropState, self.seed, iteration, dict(self._kept))

    def end_iteration(self):
        """Account the finished optimizer step; returns its layer tokens."""
        return self.scheduler.step(self.global_batch_size)

    @property
    def kept_lengths(self):
        return dict(self._kept)

    @property
    def consumed_layer_tokens(self):
        return self.scheduler.consumed_layer_tokens

    @property
    def reserved_length(self):
        return self.scheduler.reserved_length

    def effective_seq_length(self):
        """Megatron-DeepSpeed's layer-averaged sequence length at the current kept lengths."""
        return self.scheduler.layer_tokens_per_sample() // self.num_layers

    def budget_reached(self):
        budget = None if self.cfg is None else self.cfg.train_layer_tokens
        return budget is not None and self.consumed_layer_tokens >= budget

    # -- whole run ---------------------------------------------------------------------------------
    def iteration_bound(self, train_tokens=None):
        """Iterations enough for a --train-layer-tokens or --train-tokens budget. Kept lengths
        only grow, so the first step is the cheapest: dividing by it bounds the count."""
        first = RandomLTDScheduler.from_config(self.cfg if self.enabled else None,
                                               self.num_layers, self.seq_length)
        first.kept_lengths(0)
        first_per_sample = first.layer_tokens_per_sample()
        bounds = []
        if self.cfg is not None and self.cfg.train_layer_tokens is not None:
            budget = self.cfg.train_layer_tokens
            max_iters = math.ceil(budget / (self.global_batch_size * first_per_sample))
            bounds.append(iterations_for_layer_tokens(self.scheduler, budget,
                                                      self.global_batch_size, max_iters))
        if train_tokens is not None:
            eff = max(first_per_sample // self.num_layers, 1)
            bounds.append(math.ceil(train_tokens / (self.global_batch_size * eff)))
        return min(bounds) if bounds else None

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)
