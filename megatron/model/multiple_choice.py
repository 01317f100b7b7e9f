"""Megatron-LM's multiple-choice model (RACE): each choice is one BERT sequence; the choices of a
sample are scored jointly.

Inputs [b, c, s] (c choices) are flattened to [b * c, s] rows, encoded and pooled; dropout and
``multichoice_head`` (linear h -> 1) give one score per row, reshaped to logits [b, c] for a
softmax over the choices. Between pipeline stages a sample travels as its c rows
(``Provider.rows_per_sample``). Parameter names are Megatron's (``multichoice_head``).
"""

from typing import Optional, Sequence

import torch

from megatron.ltd.dropping import TokenDropState
from megatron.model.classification import PooledHeadModel
from megatron.model.config import TransformerConfig
from megatron.parallel.state import ParallelState


def _rows(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[b, c, s] -> [b * c, s] (None stays None: a later pipeline stage has no input ids)."""
    return None if x is None else x.reshape(-1, x.size(-1))


class MultipleChoice(PooledHeadModel):
    """Megatron's ``MultipleChoice``: pooled -> dropout -> ``multichoice_head`` (h -> 1)."""

    head_name = "multichoice_head"
    dropout_name = "multichoice_dropout"

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState(),
                 pre_process: bool = True, post_process: bool = True,
                 layer_ids: Optional[Sequence[int]] = None):
        super().__init__(config, 1, parallel, pre_process, post_process, layer_ids)

    def forward(self, input_ids: Optional[torch.Tensor], padding_mask: torch.Tensor,
                tokentype_ids: Optional[torch.Tensor] = None,
                token_drop: Optional[TokenDropState] = None) -> torch.Tensor:
        """input_ids, padding_mask (1 = real token), tokentype_ids: [b, c, s] -> logits [b, c]
        on the last stage, hidden states [b * c, s, h] elsewhere. ``token_drop``: random-LTD
        over the [b * c] rows."""
        num_choices = padding_mask.size(1)
        out = self._encode(_rows(input_ids), _rows(padding_mask), _rows(tokentype_ids),
                           token_drop)
        return out.view(-1, num_choices) if self.post_process else out
