"""GPT as in Megatron-LM: language model + tied (or untied) LM head + vocab-parallel loss."""

from typing import Optional, Sequence

import torch

from megatron.ltd.dropping import TokenDropState
from megatron.model.config import TransformerConfig
from megatron.model.language_model import TransformerLanguageModel
from megatron.model.module import LanguageModule
from megatron.parallel.state import ParallelState


class GPTModel(LanguageModule):
    """Causal language model. Parameter names are Megatron-LM's GPT checkpoint names.

    ``pre_process``: this pipeline stage embeds tokens; ``post_process``: it applies the final
    LayerNorm, the LM head and the loss. ``layer_ids``: global indices of the layers held here.
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState(),
                 pre_process: bool = True, post_process: bool = True,
                 layer_ids: Optional[Sequence[int]] = None):
        super().__init__(config, parallel, pre_process, post_process)
        self.language_model = TransformerLanguageModel(
            config, parallel, pre_process=pre_process, post_process=post_process,
            layer_ids=layer_ids, causal=True)
        self._init_tied_head()

    def forward(self, input_ids: Optional[torch.Tensor],
                position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                token_drop: Optional[TokenDropState] = None) -> torch.Tensor:
        """input_ids [b, s]; position_ids [b, s] (default 0..s-1; read by learned position
        embeddings only: rope, as in Megatron, rotates by the index in the sequence);
        attention_mask bool [b|1, 1, s, s], True = masked out (default: causal); labels [b, s];
        token_drop: random-LTD for this micro-batch (dropping only in training mode; None: dense).

        Returns the per-token loss [b, s] in fp32 when ``labels`` are given, else the logits
        [b, s, V/tp]; on a non-last pipeline stage, the hidden states [b, s, h] (with sequence
        parallelism this rank's chunk [b, s / tp, h]; loss and logits always cover all s).
        """
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids)  # [b, s]
        hidden = self.language_model(input_ids, position_ids, attention_mask,
                                     token_drop=token_drop)  # [b, s, h]
        if not self.post_process:
            return hidden
        logits = self.lm_logits(hidden)  # [b, s, V/tp]
        if labels is None:
            return logits
        return self.compute_language_model_loss(labels, logits)
