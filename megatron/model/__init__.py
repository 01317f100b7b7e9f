"""GPT and BERT models built from tensor-parallel layers on one base (LanguageModule)."""

from megatron.model.bert import BertModel
from megatron.model.config import TransformerConfig
from megatron.model.gpt import GPTModel
from megatron.model.module import LanguageModule, LoadPolicy
from megatron.model.transformer import ParallelTransformer, ParallelTransformerLayer

__all__ = ["TransformerConfig", "GPTModel", "BertModel", "LanguageModule", "LoadPolicy",
           "ParallelTransformer", "ParallelTransformerLayer"]
