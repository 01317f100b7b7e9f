"""TokenBypass (Hou et al. 2022, "Token Dropping for Efficient BERT Pretraining") for GPT and BERT.

What is kept
    Every vocabulary id has an importance: the running average (EMA, ``beta = 0.995``, initial
    value 10, as Hou et al.) of the LM loss attributed to it. A position's importance is the
    importance of its id; each sample keeps its ``r`` most important positions (ties broken by
    random-LTD's hash, so the choice is deterministic), special tokens always (GPT: EOD),
    padding never. The kept set is the SAME for all bypassed layers: by default the middle
    layers ``L/2 .. L-2`` (``bypass_layer_ids``); layers before ``L/2`` and the last layer run
    on all tokens, and the dropped tokens bypass the whole range and are merged back before the
    last layer. The kept length ``r`` comes from the random-LTD kept-length schedule options.

Which id a loss belongs to (GPT)
    The loss at position ``i`` is the cross entropy of predicting ``labels[i]`` (the token at
    ``i + 1``) from the input up to ``i``, and it is attributed to the TARGET id ``labels[i]``;
    the importance of position ``i`` is ``EMA[labels[i]]``. This is the closest analogue of
    MLM, where the loss of a masked position is that of its (original) token. Note the
    consequence: which positions run through the bypassed layers depends on the next token, so
    in training the last layer can tell "hard next token" positions (kept) from "easy" ones
    (bypassed). Evaluation never drops, so reported validation losses are unaffected, but the
    training loss of a TokenBypass run may be optimistic. ``TokenImportance(attribute_to=
    "input")`` attributes the loss to the input id ``tokens[i]`` instead (causal: no future
    information), for the comparison.

BERT (encoders, ``encoder=True``; Hou et al.'s setting)
    The loss of a masked position is attributed to its ORIGINAL id (``labels``), the positions
    are ranked by the importance of their INPUT id (``tokens``): ``attribute_to="mlm"``.
    Special ids ([CLS], [SEP], [MASK], [UNK]) are always kept (the entry point marks them),
    padding never while real tokens remain (priority -inf; a sample with fewer real tokens than
    the kept length fills the rest with padding, which no token attends to and no loss reads).
    Layers: the dropping layers are ``L/2-1 .. L-2`` (``bypass_layer_ids(L, encoder=True)``)
    and the FIRST of them (``query_layer_ids``) is the *query layer*: the kept tokens are its
    queries and ALL tokens its keys and values (the padding mask as usual); its output replaces
    the kept tokens, the dropped ones skip it. Layers ``L/2 .. L-2`` then run on the kept tokens
    only (the same kept set: one selection for all the layers), the dropped tokens are merged
    back before the last layer, which is full. With ``--random-ltd-layer-ids`` the smallest
    given id is the query layer.

    Layer tokens: the query layer is counted at the KEPT length. Layer tokens count the tokens a
    layer produces (its queries), and what it spends on the dropped tokens (their key/value
    projection, about 1/6 of a layer's linear FLOPs per token at ffn = 4h, plus the wasted query
    rows of the fused QKV projection) is of the same kind as attention's quadratic term, which
    the random-LTD paper's LayerToken also leaves out; counting it at full length would charge
    the layer's MLP (2/3 of its FLOPs) for tokens it never runs.

When the table changes
    ``observe`` accumulates per-id loss sums and counts for every training micro-batch of an
    optimizer step (positions with a zero loss mask or a non-finite loss are left out); ``step``
    (called by the driver's ``end_iteration``) applies one EMA update per id present, with that
    id's mean loss over the step's global batch:
    ``ema[id] = beta * ema[id] + (1 - beta) * mean``. Updating once per optimizer step, rather
    than per micro-batch, makes every micro-batch of a step select with the same table and the
    table independent of the micro-batch split (like the kept lengths, which are per iteration).
    Evaluation passes no token_drop, so it never updates the table.

Parallelism
    Under data parallelism the per-id sums and counts of a step are all-reduced over the
    data-parallel group before ``step`` (``pending`` / ``set_pending`` expose them; the driver's
    ``_share_importance_update``), so that every rank holds the same table; under pipeline
    parallelism only the last stage sees the losses and broadcasts them along the pipeline. Tensor
    parallel ranks compute identical per-token losses and need nothing. Per-id sums use
    ``index_put_(accumulate=True)``, whose CUDA path is deterministic under
    ``torch.use_deterministic_algorithms``.
"""

from dataclasses import replace
from typing import Optional, Tuple

import torch

from megatron.errors import UserError

__all__ = ["TokenImportance", "bypass_layer_ids", "query_layer_ids", "tokenbypass_config",
           "BETA", "INITIAL_IMPORTANCE"]

BETA = 0.995
INITIAL_IMPORTANCE = 10.0
ATTRIBUTIONS = ("target", "input", "mlm")
METHODS = ("tokenbypass", "sctd")  # the methods that select by importance (SCTD drops as this)


def bypass_layer_ids(num_layers: int, encoder: bool = False) -> Tuple[int, ...]:
    """TokenBypass's dropping layers, 0-based: ``L//2 .. L-2`` (empty for ``L < 3``); for an
    encoder (BERT) ``L//2-1 .. L-2``, the first of them the query layer."""
    if num_layers < 3:
        return ()
    return tuple(range(num_layers // 2 - (1 if encoder else 0), num_layers - 1))


def query_layer_ids(cfg, encoder: bool) -> Tuple[int, ...]:
    """The layers that run the kept tokens as queries over all tokens as keys/values: for an
    encoder with TokenBypass (or SCTD) the smallest dropping layer; else none."""
    if not encoder or cfg is None or not cfg.enabled or cfg.method not in METHODS \
            or not cfg.layer_ids:
        return ()
    return (min(cfg.layer_ids),)


def tokenbypass_config(cfg, encoder: bool = False):
    """``cfg`` with TokenBypass's layers: the default random-LTD layers ``1 .. L-2`` become
    ``L/2 .. L-2`` (encoder: ``L/2-1 .. L-2``); layer ids given explicitly (any other list) are
    kept as given. Idempotent; also for SCTD, which drops as TokenBypass."""
    if cfg is None or not cfg.enabled or cfg.method not in METHODS:
        return cfg
    if tuple(cfg.layer_ids) != tuple(range(1, cfg.num_layers - 1)):
        return cfg
    if cfg.layer_starts is not None:
        raise UserError("--random-ltd-layer-starts with --random-ltd-method tokenbypass needs "
                        "--random-ltd-layer-ids (the default bypass layers are L/2 .. L-2)")
    return replace(cfg, layer_ids=bypass_layer_ids(cfg.num_layers, encoder))


class TokenImportance:
    """Per-vocabulary-id running average of the LM loss; see the module docstring.

    The table grows on demand (new ids start at ``initial``), so the vocabulary size need not be
    known; ``vocab_size`` preallocates it. ``ema`` is float64 and lives on the device of the
    first labels seen; ``state_dict`` holds a CPU copy.
    """

    def __init__(self, vocab_size: int = 0, beta: float = BETA,
                 initial: float = INITIAL_IMPORTANCE, attribute_to: str = "target"):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if attribute_to not in ATTRIBUTIONS:
            raise ValueError(f"attribute_to must be one of {ATTRIBUTIONS}, got {attribute_to!r}")
        self.beta = float(beta)
        self.initial = float(initial)
        self.attribute_to = attribute_to
        self.ema = torch.full((int(vocab_size),), self.initial, dtype=torch.float64)
        self._sums: Optional[torch.Tensor] = None  # float64 [V], this step's per-id loss sums
        self._counts: Optional[torch.Tensor] = None  # int64 [V]

    # -- table ------------------------------------------------------------------------------------
    def _grow(self, size: int, device) -> None:
        self.ema = self.ema.to(device)
        if size > self.ema.numel():
            extra = torch.full((size - self.ema.numel(),), self.initial, dtype=torch.float64,
                               device=self.ema.device)
            self.ema = torch.cat([self.ema, extra])

    def importance(self, ids: torch.Tensor) -> torch.Tensor:
        """Importance of each id (any shape, float64); unseen ids get ``initial``. No side
        effects."""
        ids = ids.to(torch.int64)
        table = self.ema.to(ids.device)
        known = (ids >= 0) & (ids < table.numel())
        if table.numel() == 0:
            return torch.full(ids.shape, self.initial, dtype=torch.float64, device=ids.device)
        values = table[ids.clamp(0, table.numel() - 1)]
        return torch.where(known, values, torch.full_like(values, self.initial))

    def position_importance(self, labels: torch.Tensor,
                            tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b, s] importance of each position: of its target id (``labels``) or, with
        ``attribute_to='input'`` or ``'mlm'`` (BERT), of its input id (``tokens``)."""
        return self.importance(self._ids(labels, tokens, rank=True))

    def _ids(self, labels, tokens, rank=False):
        """The ids losses are attributed to (``rank=False``) or positions ranked by."""
        if self.attribute_to == "input" or (rank and self.attribute_to == "mlm"):
            if tokens is None:
                raise ValueError("TokenImportance(attribute_to='input') needs the input tokens")
            return tokens
        if labels is None:
            raise ValueError("TokenImportance needs the labels (target ids)")
        return labels

    # -- updates ----------------------------------------------------------------------------------
    def observe(self, labels: torch.Tensor, losses: torch.Tensor,
                loss_mask: Optional[torch.Tensor] = None,
                tokens: Optional[torch.Tensor] = None) -> None:
        """Add one training micro-batch's per-token losses [b, s] (attributed to ``labels``, or
        to ``tokens`` with ``attribute_to='input'``) to this step's per-id sums and counts."""
        ids = self._ids(labels, tokens).reshape(-1).to(torch.int64)
        losses = losses.detach().reshape(-1).to(torch.float64)
        if ids.numel() != losses.numel():
            raise ValueError(f"{ids.numel()} ids for {losses.numel()} losses")
        keep = torch.isfinite(losses) & (ids >= 0)
        if loss_mask is not None:
            keep &= loss_mask.reshape(-1).to(keep.device) > 0
        ids, losses = ids[keep], losses[keep]
        size = max(self.ema.numel(), int(ids.max()) + 1 if ids.numel() else 0)
        self._grow(size, ids.device)
        if self._sums is None:
            self._sums = torch.zeros_like(self.ema)
            self._counts = torch.zeros(self.ema.shape, dtype=torch.int64, device=self.ema.device)
        elif self._sums.numel() < size:
            pad = size - self._sums.numel()
            self._sums = torch.cat([self._sums, self._sums.new_zeros(pad)])
            self._counts = torch.cat([self._counts, self._counts.new_zeros(pad)])
        self._sums.index_put_((ids,), losses, accumulate=True)
        self._counts.index_put_((ids,), torch.ones_like(ids), accumulate=True)

    def pending(self):
        """This step's (per-id loss sums, per-id counts), or None: what data parallelism must
        all-reduce before ``step``."""
        return None if self._sums is None else (self._sums, self._counts)

    def set_pending(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Replace this step's sums and counts (e.g. by their all-reduced values)."""
        self._grow(max(self.ema.numel(), sums.numel()), sums.device)
        self._sums = torch.zeros_like(self.ema)
        self._counts = torch.zeros(self.ema.shape, dtype=torch.int64, device=self.ema.device)
        self._sums[:sums.numel()] = sums.to(self.ema.device, torch.float64)
        self._counts[:counts.numel()] = counts.to(self.ema.device, torch.int64)

    def step(self) -> int:
        """One EMA update per id observed since the last step; returns how many ids changed."""
        if self._sums is None:
            return 0
        sums, counts = self._sums, self._counts
        self._sums = self._counts = None
        present = (counts > 0).nonzero().squeeze(1)
        if present.numel():
            mean = sums[present] / counts[present].to(torch.float64)
            self.ema[present] = self.beta * self.ema[present] + (1.0 - self.beta) * mean
        return int(present.numel())

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ema": self.ema.detach().cpu().clone(), "beta": self.beta,
                "initial": self.initial, "attribute_to": self.attribute_to}

    def load_state_dict(self, sd) -> None:
        if float(sd.get("beta", self.beta)) != self.beta \
                or float(sd.get("initial", self.initial)) != self.initial \
                or sd.get("attribute_to", self.attribute_to) != self.attribute_to:
            raise UserError(f"checkpoint's TokenBypass importance (beta {sd.get('beta')}, "
                            f"initial {sd.get('initial')}, {sd.get('attribute_to')}) differs "
                            f"from this run's (beta {self.beta}, initial {self.initial}, "
                            f"{self.attribute_to})")
        self.ema = sd["ema"].detach().to(self.ema.device, torch.float64).clone()
        self._sums = self._counts = None
