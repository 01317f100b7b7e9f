"""SCTD (Zhong et al. 2023, "Revisiting Token Dropping Strategy in Efficient BERT Pretraining"):
semantic-consistent learning on top of TokenBypass for BERT (``--random-ltd-method sctd``).

What a step does
    Every ``--sctd-interval`` F iterations (default 10) a *dual* step runs, on the same masked
    micro-batch, the full-sequence pass (no token dropping) and the token-dropped pass (dropping
    as TokenBypass: the kept set ranked by the per-id MLM-loss EMA, special tokens always kept,
    padding never, layers ``L/2 .. L-2``, kept length from the schedule flags, by default a
    constant half of the sequence). The loss of a dual step is::

        w * (MLM_full + SOP_full) + w * (MLM_drop + SOP_drop) + lambda * (KL_last + KL_pen)

    with ``w = --sctd-mlm-weight`` (0.5) and ``lambda = --sctd-kl-weight`` (0.05). Every other
    step is the plain token-dropped pass, exactly TokenBypass's step. Dual steps are the
    iterations ``t`` with ``(t + 1) % F == 0``: F - 1 dropped steps, then one dual step (the
    paper's Fig. 5, "token drop x (F_i - 1)" then the semantic-consistent step); a pure function
    of the iteration, so resume and every parallel layout agree on it.

The KL terms
    ``KL_last``: between the [CLS] hidden states (position 0) of the encoder's output (the last
    layer, after the final LayerNorm: what the pooler and the MLM head see) of the two passes;
    ``KL_pen``: between the [CLS] hidden states entering the last layer (the penultimate layer's
    output). Each is softmax-normalised over the hidden dimension, in fp32, and the divergence
    is ``KL(P_full || P_drop) = sum_h P_full * (log P_full - log P_drop)``, averaged over the
    samples. Direction and gradient: the full-sequence pass is the reference the dropped pass
    must stay semantically consistent with (the paper aligns the token-dropping model to the
    baseline model), so it is the KL's first argument and is DETACHED: the KL's gradient flows
    only into the dropped pass. The full pass is still trained by its own MLM/SOP terms.

Model and parallelism
    ``BertModel`` runs both passes inside ONE forward (so torch DDP sees one forward per
    micro-batch): the embedding once (its dropout mask shared), then the stage's layers on the
    full sequence, then on the same input with dropping. Under pipeline parallelism a dual step
    sends the two passes as one doubled batch ``[2b, s, h]`` (full first) through the stages;
    the training loop sets the step's p2p tensor shape from ``token_drop.batch_multiplier``.
    Tensor and sequence parallelism need nothing more (the [CLS] row is gathered as the pooler
    does).

Logged names
    ``lm loss`` / ``sop loss`` are the dropped pass's on every step (one homogeneous curve);
    dual steps add ``sctd full lm loss``, ``sctd full sop loss``, ``sctd kl loss``
    (``KL_last + KL_pen``, unweighted), ``sctd kl last`` and ``sctd kl penultimate``.

Layer tokens
    A dual step's extra full pass costs ``s * L`` layer tokens per sample on top of the dropped
    pass (``TokenDroppingDriver.end_iteration``). The importance table is updated from the
    dropped pass's per-token losses on every step, as TokenBypass.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from megatron.ltd.driver import TokenDropper
from megatron.ltd.dropping import TokenDropState

__all__ = ["is_dual_step", "SCTDDropper", "SCTDDrop", "SCTDOutput", "cls_kl", "sctd_loss"]


def is_dual_step(iteration: int, interval: int) -> bool:
    """True when ``iteration`` (0-based) runs the full-sequence pass too (the rule of
    ``RandomLTDScheduler.runs_full_pass``, which the driver and the layer-token tables use)."""
    return (int(iteration) + 1) % int(interval) == 0


@dataclass(frozen=True)
class SCTDDrop:
    """What ``BertModel`` gets on a dual step: the dropped pass's ``TokenDropState``."""

    drop: TokenDropState


class SCTDOutput(NamedTuple):
    """A dual step's last-stage output. ``[0]``/``[1]`` are the dropped pass's (per-token MLM
    loss [b, s], binary logits [b, 2] or None), so code that reads a plain BERT output (the
    importance table's observer) sees the dropped pass."""

    lm_loss: torch.Tensor
    binary_logits: Optional[torch.Tensor]
    full_lm_loss: torch.Tensor
    full_binary_logits: Optional[torch.Tensor]
    cls_last_full: torch.Tensor         # [b, h]
    cls_penultimate_full: torch.Tensor  # [b, h]
    cls_last_drop: torch.Tensor
    cls_penultimate_drop: torch.Tensor


class SCTDDropper(TokenDropper):
    """The ``token_drop`` callable of one SCTD iteration: TokenBypass's selection; on a dual
    step the state is wrapped in ``SCTDDrop`` and the pipeline carries a doubled batch."""

    def __init__(self, *args, dual: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.dual = bool(dual)

    @property
    def batch_multiplier(self) -> int:
        """Samples per micro-batch sample in the activations between pipeline stages."""
        return 2 if self.dual else 1

    def __call__(self, sample_ids, **kwargs):
        state = super().__call__(sample_ids, **kwargs)
        return SCTDDrop(state) if self.dual else state


def cls_kl(reference: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) || softmax(hidden))`` over the last dimension, in fp32, averaged
    over the rows; ``reference`` is detached (see the module docstring)."""
    ref = F.log_softmax(reference.detach().float(), dim=-1)
    log_q = F.log_softmax(hidden.float(), dim=-1)
    return (ref.exp() * (ref - log_q)).sum(-1).mean()


def _masked_mean(per_token, loss_mask):
    return (per_token.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def sctd_loss(output: SCTDOutput, loss_mask, sentence_order, *, mlm_weight: float,
              kl_weight: float):
    """A dual step's loss and its named parts (see the module docstring)."""
    lm_drop = _masked_mean(output.lm_loss, loss_mask)
    lm_full = _masked_mean(output.full_lm_loss, loss_mask)
    kl_last = cls_kl(output.cls_last_full, output.cls_last_drop)
    kl_pen = cls_kl(output.cls_penultimate_full, output.cls_penultimate_drop)
    kl = kl_last + kl_pen
    total = mlm_weight * (lm_full + lm_drop) + kl_weight * kl
    report = {"lm loss": lm_drop.detach()}
    parts = {"sctd full lm loss": lm_full.detach()}
    if output.binary_logits is not None:
        def sop(logits):
            return F.cross_entropy(logits.view(-1, 2).float(), sentence_order.view(-1),
                                   ignore_index=-1)

        sop_drop, sop_full = sop(output.binary_logits), sop(output.full_binary_logits)
        total = total + mlm_weight * (sop_full + sop_drop)
        report["sop loss"] = sop_drop.detach()
        parts["sctd full sop loss"] = sop_full.detach()
    parts.update({"sctd kl loss": kl.detach(), "sctd kl last": kl_last.detach(),
                  "sctd kl penultimate": kl_pen.detach()})
    report.update(parts)
    return total, report
