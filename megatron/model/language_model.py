"""Megatron's TransformerLanguageModel: embedding -> encoder (the block) [-> untied output layer]
[, BERT's pooler].

It exists to give parameters Megatron's names (``language_model.embedding...``,
``language_model.encoder...``, ``language_model.output_layer.weight``) and to hold the pipeline
stage logic: the first stage embeds, later stages take their input from ``set_input_tensor``.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron.ltd.dropping import TokenDropState
from megatron.model.config import TransformerConfig
from megatron.model.embedding import Embedding
from megatron.model.transformer import ParallelTransformer
from megatron.model.utils import init_method_normal, seeded_init
from megatron.parallel.layers import ColumnParallelLinear
from megatron.parallel.mappings import (copy_to_tp_region, gather_from_sequence_parallel_region,
                                        gather_from_tp_region)
from megatron.parallel.state import ParallelState


def parallel_lm_logits(hidden: torch.Tensor, weight: torch.Tensor, parallel: ParallelState,
                       parallel_output: bool = True,
                       sequence_parallel: bool = False) -> torch.Tensor:
    """Logits ``hidden [b, s, h] @ weight[V/tp, h]^T`` -> [b, s, V/tp] (column-parallel path:
    the input gradient is all-reduced across TP ranks); gathered to [b, s, V] unless
    ``parallel_output``. ``sequence_parallel``: ``hidden`` is this rank's chunk [b, s/tp, h],
    all-gathered here (its gradient reduce-scattered), so the logits cover the full sequence."""
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, parallel)  # [b, s, h]
    else:
        hidden = copy_to_tp_region(hidden, parallel)
    logits = F.linear(hidden, weight)  # [b, s, V/tp]
    return logits if parallel_output else gather_from_tp_region(logits, parallel)


class TransformerLanguageModel(nn.Module):
    """Embedding (first stage), encoder, and the untied output layer and the pooler (last
    stage). ``causal``: GPT's causal attention (else bidirectional, BERT); ``add_pooler``:
    hold BERT's pooler (``language_model.pooler``), applied by the model."""

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState(), *,
                 pre_process: bool = True, post_process: bool = True,
                 layer_ids: Optional[Sequence[int]] = None, causal: bool = True,
                 add_pooler: bool = False):
        super().__init__()
        self.pre_process = pre_process
        self.post_process = post_process
        self.rope = config.position_embedding_type == "rope"
        self.input_tensor = None
        if pre_process:
            with seeded_init(config.init_seed, 0):
                self.embedding = Embedding(config, parallel)
        self.encoder = ParallelTransformer(config, parallel, layer_ids=layer_ids,
                                           post_process=post_process, causal=causal)
        if post_process and config.untie_embeddings_and_output_weights:
            with seeded_init(config.init_seed, config.num_layers + 1):
                self.output_layer = self._output_layer(config, parallel)
        if post_process and add_pooler:  # BERT's [CLS] pooler (Megatron keeps it here)
            from megatron.model.heads import Pooler

            with seeded_init(config.init_seed, config.num_layers + 2):
                self.pooler = Pooler(config, parallel)

    @staticmethod
    def _output_layer(config, parallel):
        return ColumnParallelLinear(
            config.hidden_size, config.padded_vocab_size, bias=False, gather_output=False,
            init_method=init_method_normal(config.init_method_std), parallel=parallel,
            params_dtype=config.params_dtype, sequence_parallel=config.sequence_parallel)

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """Hidden states [b, s, h] received from the previous pipeline stage."""
        self.input_tensor = tensor

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                tokentype_ids: Optional[torch.Tensor] = None,
                token_drop: Optional[TokenDropState] = None) -> torch.Tensor:
        """-> hidden states [b, s, h] (final-normed on the last stage). ``token_drop``:
        random-LTD for this micro-batch, passed to the encoder (see ParallelTransformer).

        ``position_ids`` [b, s] index the learned position embeddings. Rope ignores them, as in
        Megatron-LM (its RotaryEmbedding(seq_length) rotates token i of the sequence by
        position i): the encoder's layers get each token's index in the sequence, so
        --reset-position-ids changes learned position embeddings only, never rope."""
        if self.rope:
            s = position_ids.size(-1)
            position_ids = torch.arange(s, device=position_ids.device).expand(
                position_ids.shape)  # [b, s]
        if self.pre_process:
            hidden = self.embedding(input_ids, position_ids, tokentype_ids)
        else:
            if self.input_tensor is None:
                raise RuntimeError("a non-first pipeline stage needs set_input_tensor() first")
            hidden = self.input_tensor
        return self.encoder(hidden, position_ids, attention_mask, token_drop=token_drop)
