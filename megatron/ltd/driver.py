"""The training loop's view of random-LTD: per-iteration kept lengths and layer-token accounting.

Units (see schedule.py): the kept-length schedule runs on the iteration (or on raw consumed
tokens for token-based schedules); *layer tokens* are tokens summed over all layers; the
*effective sequence length* is Megatron-DeepSpeed's layer-averaged length
``(s*(L-n) + r*n) // L``, which is what Megatron-DeepSpeed adds to "consumed tokens" (and so to
``--train-tokens`` and token-based LR) when random-LTD is on. A baseline run (random-LTD off)
still counts layer tokens (``s * L`` per sample) so that the two compare at equal compute.

Methods (``--random-ltd-method``): ``random`` draws each dropping layer's kept tokens by the
hash of ``megatron.ltd.dropping``; with ``--random-ltd-keep-special-tokens`` the special tokens
the entry point marks (GPT: EOD) are always among them; with ``--random-ltd-real-tokens-only``
they are drawn among the real tokens (BERT's padding is kept only where a sample has fewer real
tokens than the kept length). ``tokenbypass`` keeps the most important
tokens by a per-id loss EMA (``megatron.ltd.tokenbypass``), one kept set for all its layers,
which default to ``L/2 .. L-2`` (``self.cfg.layer_ids``; layer-token accounting follows them);
special tokens are always kept. ``sctd`` (``megatron.ltd.sctd``) drops as ``tokenbypass``
(same layers, table and selection) and every ``--sctd-interval`` iterations also runs the
full-sequence pass in the same forward (``SCTDDropper.dual``); ``end_iteration`` then adds its
``s * L`` layer tokens per sample.

The ``token_drop`` callable (``TokenDropper``) takes the micro-batch's sample ids and, as keyword
arguments, what the entry point knows per position: ``special_mask`` [b, s] (always kept when
asked for), ``labels`` [b, s] (TokenBypass importance), ``tokens``, ``padding_mask`` (never kept
by TokenBypass). Entry points tell it apart from a plain ``sample_ids -> TokenDropState``
callable by ``accepts_tokens``. After the forward, the entry point's loss function hands it the
per-token losses (``observe_losses``); TokenBypass's table is updated from them once per
optimizer step, in ``end_iteration``.
"""

import math

import torch

from megatron.ltd.dropping import TokenDropState
from megatron.ltd.layer_tokens import iterations_for_layer_tokens
from megatron.ltd.schedule import RandomLTDScheduler
from megatron.ltd.tokenbypass import TokenImportance, query_layer_ids, tokenbypass_config


def token_drop_for_batch(token_drop, sample_ids, *, tokens=None, labels=None, loss_mask=None,
                         special_mask=None, padding_mask=None):
    """The hook an entry point's ``forward_step`` calls once per micro-batch.

    ``token_drop`` is what the schedule passed to ``forward_step``: None (evaluation, or a dense
    step), a ``TokenDropper`` (gets what the entry point knows per position [b, s]:
    ``special_mask`` True at special tokens, ``padding_mask`` True at padding, ``labels``,
    ``tokens``, ``loss_mask``), or a plain ``sample_ids -> TokenDropState`` callable (tests,
    studies). Returns ``(state, observe)``: the ``TokenDropState`` to pass to the model (None:
    dense), and None or ``observe(per_token_loss [b, s])`` for the loss function to call on the
    training forward's per-token losses (TokenBypass's importance table).
    """
    if token_drop is None:
        return None, None
    if not getattr(token_drop, "accepts_tokens", False):
        return token_drop(sample_ids), None
    state = token_drop(sample_ids, special_mask=special_mask, labels=labels, tokens=tokens,
                       padding_mask=padding_mask)
    if not token_drop.wants_losses:
        return state, None

    def observe(per_token_loss):
        token_drop.observe_losses(labels, per_token_loss.detach(), loss_mask, tokens)

    return state, observe


class TokenDropper:
    """The ``token_drop`` callable of one iteration: a micro-batch -> ``TokenDropState``."""

    accepts_tokens = True
    """Entry points may pass ``special_mask``/``labels``/``tokens``/``padding_mask``."""

    def __init__(self, seed, iteration, kept_lengths, *, keep_special=False, importance=None,
                 real_tokens_only=False, query_layers=()):
        self.seed = seed
        self.iteration = iteration
        self.kept_lengths = dict(kept_lengths)
        self.keep_special = keep_special
        self.importance = importance
        self.real_tokens_only = real_tokens_only
        self.query_layers = tuple(query_layers)  # BERT TokenBypass: kept queries, all keys

    def __call__(self, sample_ids, *, special_mask=None, labels=None, tokens=None,
                 padding_mask=None):
        priority = None
        if self.importance is not None:
            priority = self.importance.position_importance(labels, tokens)
            if padding_mask is not None:
                priority = priority.masked_fill(padding_mask.to(priority.device), -math.inf)
        elif self.real_tokens_only and padding_mask is not None:
            # Real tokens before padding, each group in hash order: a uniform subset of the
            # real tokens, padding only where a sample has fewer real tokens than the kept
            # length. Without padding the order, and so the draw, is plain random-LTD's.
            priority = padding_mask.to(torch.float32).neg()  # 0 real, -1 padding
        keep = special_mask if self.keep_special else None
        return TokenDropState(self.seed, self.iteration, self.kept_lengths, sample_ids,
                              keep_mask=keep, priority=priority,
                              shared_layers=self.importance is not None,
                              query_layers=self.query_layers)

    @property
    def uses_importance(self):
        """True when the kept set is TokenBypass's importance selection (TokenBypass, SCTD)."""
        return self.importance is not None

    @property
    def wants_losses(self):
        """True when ``observe_losses`` does something (TokenBypass)."""
        return self.importance is not None

    def observe_losses(self, labels, per_token_loss, loss_mask=None, tokens=None):
        """A training micro-batch's per-token losses [b, s] (TokenBypass's table; else no-op)."""
        if self.importance is not None:
            with torch.no_grad():
                self.importance.observe(labels, per_token_loss, loss_mask, tokens)


class TokenDroppingDriver:
    """Owns the ``RandomLTDScheduler`` of a run; one ``begin``/``end`` pair per iteration."""

    def __init__(self, cfg, *, num_layers, seq_length, global_batch_size, seed, encoder=False):
        # encoder (BERT): TokenBypass's encoder variant, layers L/2-1 .. L-2 with L/2-1 the
        # query layer, MLM losses attributed to the original id, positions ranked by input id.
        # (SCTD drops as TokenBypass: tokenbypass_config covers both methods.)
        cfg = tokenbypass_config(cfg, encoder)
        self.cfg = cfg
        self.enabled = cfg is not None and cfg.enabled
        self.method = cfg.method if self.enabled else None
        self.importance = TokenImportance(attribute_to="mlm" if encoder else "target") \
            if self.method in ("tokenbypass", "sctd") else None
        self.query_layers = query_layer_ids(cfg, encoder)
        self._dual = False  # SCTD: this iteration runs the full-sequence pass too
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
        (a ``TokenDropper``: micro-batch sample ids -> TokenDropState) or None for a dense step."""
        self._kept = self.scheduler.kept_lengths(iteration) if self.enabled else {}
        self._dual = False
        if not self._kept:
            return None
        keep_special = self.method in ("tokenbypass", "sctd") or self.cfg.keep_special_tokens
        if self.method == "sctd":
            from megatron.ltd.sctd import SCTDDropper

            self._dual = self.scheduler.runs_full_pass(iteration)
            return SCTDDropper(self.seed, iteration, self._kept, keep_special=keep_special,
                               importance=self.importance, dual=self._dual,
                               query_layers=self.query_layers)
        return TokenDropper(self.seed, iteration, self._kept, keep_special=keep_special,
                            importance=self.importance,
                            real_tokens_only=self.cfg.real_tokens_only,
                            query_layers=self.query_layers)

    def observe_losses(self, labels, per_token_loss, loss_mask=None, tokens=None):
        """A training micro-batch's per-token losses (TokenBypass's table; else no-op)."""
        if self.importance is not None:
            with torch.no_grad():
                self.importance.observe(labels, per_token_loss, loss_mask, tokens)

    def end_iteration(self, parallel=None, batch_size=None):
        """Account the finished optimizer step of ``batch_size`` samples (default the global
        batch; --rampup-batch-size varies it) and apply TokenBypass's per-step EMA update;
        returns its layer tokens. Called on every rank."""
        if self.importance is not None:
            if parallel is not None and parallel.world_size > 1:
                self._share_importance_update(parallel)
            self.importance.step()
        # (SCTD's dual step: the scheduler counts the full-sequence pass, s * L per sample.)
        self._dual = False
        return self.scheduler.step(batch_size or self.global_batch_size)

    def _share_importance_update(self, parallel):
        """Make TokenBypass's table update the same on every rank: the last pipeline stage (the
        only one that sees losses) sums its per-id statistics over data-parallel replicas and
        broadcasts them along the pipeline. Tensor-parallel ranks see identical losses."""
        import torch.distributed as dist

        from megatron.parallel.initialize import comm_device

        device = comm_device()
        pending = self.importance.pending()
        sums, counts = pending if pending is not None else (torch.zeros(0), torch.zeros(0))
        size = torch.tensor([max(self.importance.ema.numel(), sums.numel())], device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)  # tables grow as ids appear: agree on size
        n = int(size)
        full_sums = torch.zeros(n, dtype=torch.float64, device=device)
        full_counts = torch.zeros(n, dtype=torch.int64, device=device)
        full_sums[:sums.numel()] = sums.detach().to(device, torch.float64)
        full_counts[:counts.numel()] = counts.detach().to(device, torch.int64)
        if parallel.dp_size > 1 and parallel.is_last_stage:
            dist.all_reduce(full_sums, group=parallel.dp_group)
            dist.all_reduce(full_counts, group=parallel.dp_group)
        if parallel.pp_size > 1:
            dist.broadcast(full_sums, src=parallel.pp_ranks[-1], group=parallel.pp_group)
            dist.broadcast(full_counts, src=parallel.pp_ranks[-1], group=parallel.pp_group)
        self.importance.set_pending(full_sums, full_counts)

    @property
    def uses_importance(self):
        """True when dropping selects by TokenBypass's importance table (TokenBypass, SCTD)."""
        return self.importance is not None

    @property
    def kept_lengths(self):
        return dict(self._kept)

    def tokens_per_layer(self):
        """{layer: tokens per sample it produces this iteration}, every layer of the model (the
        sequence length where nothing drops; TokenBypass's query layer: its kept queries); an
        SCTD dual step's full-sequence pass is not included (``full_pass`` says whether one
        runs)."""
        return {layer: min(self._kept.get(layer, self.seq_length), self.seq_length)
                for layer in range(self.num_layers)}

    @property
    def full_pass(self):
        """True while an SCTD dual step (begun, not yet ended) also runs the full sequence."""
        return self._dual

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
        """The scheduler's state; with TokenBypass also ``token_importance`` (the EMA table)."""
        state = self.scheduler.state_dict()
        if self.importance is not None:
            state["token_importance"] = self.importance.state_dict()
        return state

    def load_state_dict(self, state):
        state = dict(state)
        importance = state.pop("token_importance", None)
        self.scheduler.load_state_dict(state)
        if self.importance is not None and importance is not None:
            self.importance.load_state_dict(importance)
