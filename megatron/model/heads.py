"""Heads on top of the language model, with Megatron's parameter names: the pooler, BERT's LM
head and binary (sentence-order) head.

Their weights are replicated across tensor-parallel ranks, except the LM head's bias, which is
split over the vocabulary like the logits it is added to. Under sequence parallelism the LM
head's dense and LayerNorm see only this rank's tokens (their gradients are summed over TP before
the optimizer step, ``sequence_parallel``-tagged); the pooler gathers the full sequence first.
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.config import TransformerConfig
from megatron.model.transformer import LayerNorm
from megatron.model.utils import init_method_normal
from megatron.parallel.layers import (divide, mark_sequence_parallel,
                                      set_tensor_model_parallel_attributes)
from megatron.parallel.mappings import gather_from_sequence_parallel_region
from megatron.parallel.state import ParallelState


def linear_layer(rows: int, cols: int, config: TransformerConfig,
                 sequence_parallel: bool = False) -> nn.Linear:
    """Megatron's ``get_linear_layer``: a replicated nn.Linear, weight normal(std), bias zero."""
    layer = nn.Linear(cols, rows, dtype=config.params_dtype)
    with torch.no_grad():
        master = torch.empty(rows, cols, dtype=torch.float32)
        init_method_normal(config.init_method_std)(master)
        layer.weight.copy_(master)
        layer.bias.zero_()
    for param in (layer.weight, layer.bias):
        set_tensor_model_parallel_attributes(param, False, -1)
        if sequence_parallel:
            mark_sequence_parallel(param)
    return layer


class Pooler(nn.Module):
    """tanh(dense(hidden of the first token)): [b, s, h] -> [b, h] (Megatron's Pooler,
    ``language_model.pooler.dense``)."""

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState()):
        super().__init__()
        self.parallel = parallel
        self.sequence_parallel = config.sequence_parallel and parallel.tp_size > 1
        self.dense = linear_layer(config.hidden_size, config.hidden_size, config)

    def forward(self, hidden: torch.Tensor, index: int = 0) -> torch.Tensor:
        if self.sequence_parallel:  # the first token lives in TP rank 0's chunk: gather
            hidden = gather_from_sequence_parallel_region(hidden, self.parallel,
                                                          output_grad_is_partial=False)
        return torch.tanh(self.dense(hidden[:, index, :]))  # [b, h]


class BertLMHead(nn.Module):
    """Masked-LM head: dense -> GeLU -> LayerNorm, then the tied output weight + a
    vocab-parallel ``bias`` (Megatron's BertLMHead; ``lm_head.{dense,layernorm,bias}``)."""

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState()):
        super().__init__()
        sp = config.sequence_parallel and parallel.tp_size > 1
        self.dense = linear_layer(config.hidden_size, config.hidden_size, config, sp)
        self.layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon,
                                   config.params_dtype, sequence_parallel=sp)
        vocab_per_rank = divide(config.padded_vocab_size, parallel.tp_size,
                                "padded vocabulary size")
        self.bias = nn.Parameter(torch.zeros(vocab_per_rank, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.bias, True, 0)
        self.gelu_approximate = config.lm_head_gelu_approximate

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, s, h] -> [b, s, h] (as Megatron's BertLMHead: exact erf GeLU, tanh with
        --openai-gelu)."""
        return self.layernorm(F.gelu(self.dense(hidden), approximate=self.gelu_approximate))
