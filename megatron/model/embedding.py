"""Input embeddings: vocab-parallel word embeddings + learned positions (+ token types), dropout."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.config import TransformerConfig
from megatron.model.utils import init_method_normal
from megatron.parallel.layers import VocabParallelEmbedding, set_tensor_model_parallel_attributes
from megatron.parallel.mappings import scatter_to_sequence_parallel_region
from megatron.parallel.random import tp_region_rng
from megatron.parallel.state import ParallelState


def _replicated_embedding(rows, config, init):
    table = nn.Embedding(rows, config.hidden_size, dtype=config.params_dtype)
    with torch.no_grad():
        master = torch.empty(rows, config.hidden_size, dtype=torch.float32)
        init(master)
        table.weight.copy_(master)
    set_tensor_model_parallel_attributes(table.weight, False, -1)
    return table


class Embedding(nn.Module):
    """word_embeddings(ids) [+ position_embeddings(pos)] [+ tokentype_embeddings(types)], dropout.

    Position embeddings exist only for ``position_embedding_type == 'learned_absolute'`` (rope is
    applied inside attention). Dropout uses the default generator (the output is replicated
    across tensor-parallel ranks, so every rank must draw the same mask).

    With ``config.sequence_parallel`` the output is this rank's sequence chunk [b, s / tp, h]
    and its dropout draws from the tracker's tensor-parallel state, as in Megatron (each rank
    holds different tokens, so the masks must differ).
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState()):
        super().__init__()
        init = init_method_normal(config.init_method_std)
        self.dropout = config.hidden_dropout
        self.parallel = parallel
        self.sequence_parallel = config.sequence_parallel
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size, config.hidden_size, init_method=init, parallel=parallel,
            params_dtype=config.params_dtype)
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = _replicated_embedding(config.max_position_embeddings,
                                                             config, init)
        else:
            self.position_embeddings = None
        if config.num_tokentypes > 0:
            self.tokentype_embeddings = _replicated_embedding(config.num_tokentypes, config, init)
        else:
            self.tokentype_embeddings = None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tokentype_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, position_ids, tokentype_ids: [b, s] -> [b, s, h] ([b, s / tp, h] with
        sequence parallelism)."""
        hidden = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings(position_ids)
        if tokentype_ids is not None:
            if self.tokentype_embeddings is None:
                raise ValueError("tokentype_ids given but the model has no token-type embeddings")
            hidden = hidden + self.tokentype_embeddings(tokentype_ids)
        if self.sequence_parallel:
            hidden = scatter_to_sequence_parallel_region(hidden, self.parallel)  # [b, s/tp, h]
            if self.dropout > 0 and self.training:
                with tp_region_rng(self.parallel):
                    return F.dropout(hidden, self.dropout, self.training)
        return F.dropout(hidden, self.dropout, self.training)
