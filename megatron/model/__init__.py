"""GPT (and later BERT) models built from tensor-parallel layers."""

from megatron.model.config import TransformerConfig
from megatron.model.gpt import GPTModel
from megatron.model.transformer import ParallelTransformer, ParallelTransformerLayer

__all__ = ["TransformerConfig", "GPTModel", "ParallelTransformer", "ParallelTransformerLayer"]
