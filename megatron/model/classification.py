"""Megatron-LM's finetuning classifier: the BERT encoder, its [CLS] pooler, dropout and a linear
head (GLUE: MNLI 3 classes, QQP 2).

Parameter names and checkpoint layout are Megatron's (``language_model.{embedding,encoder,
pooler}``, ``classification_head.{weight,bias}``), so a classifier finetuned here loads in
Megatron-LM and the other way round. There is no LM head, hence no tied copy of the word
embeddings on the last pipeline stage (Megatron's ``Classification`` has none either).

``PooledHeadModel`` is the part shared with the multiple-choice model (RACE,
``megatron.model.multiple_choice``): pooler -> dropout -> ``linear_layer`` head, and the load
policy for a BERT pretraining checkpoint (its LM and sentence-order heads ignored, the task head
initialised).
"""

import dataclasses
from typing import Optional, Sequence

import torch
from torch import nn

from megatron.ltd.dropping import TokenDropState
from megatron.model.bert import bert_attention_mask
from megatron.model.config import TransformerConfig
from megatron.model.heads import linear_layer
from megatron.model.language_model import TransformerLanguageModel
from megatron.model.module import LanguageModule, LoadPolicy
from megatron.model.utils import seeded_init
from megatron.parallel.state import ParallelState

#: What a finetuning model may skip in a BERT pretraining checkpoint: the masked-LM head, the
#: sentence-order head, the last stage's copy of the word embeddings (for the LM head) and an
#: untied output layer; its own head is missing there and keeps its initialisation.
BERT_HEADS = ("lm_head.*", "binary_head.*", "word_embeddings.*",
              "language_model.output_layer.*")


def task_head_load_policy(head_name: str) -> LoadPolicy:
    """Loading BERT pretraining weights into a model with the task head ``head_name``."""
    return LoadPolicy(allow_missing=(f"{head_name}.*",), ignore_unexpected=BERT_HEADS)


class PooledHeadModel(LanguageModule):
    """BERT encoder (bidirectional, padding mask, 2 token types) -> pooler ->
    dropout(hidden dropout) -> ``<head_name>`` = linear h -> ``head_outputs``.

    Subclasses set ``head_name`` and ``dropout_name`` (Megatron's attribute names) and shape
    the inputs and logits. ``forward`` on the last stage returns the head's logits
    [rows, head_outputs]; on other stages the hidden states."""

    head_name = ""
    dropout_name = ""

    def __init__(self, config: TransformerConfig, head_outputs: int,
                 parallel: ParallelState = ParallelState(), pre_process: bool = True,
                 post_process: bool = True, layer_ids: Optional[Sequence[int]] = None):
        # No LM head: an untied output layer would be a parameter without a gradient.
        config = dataclasses.replace(config, untie_embeddings_and_output_weights=False)
        super().__init__(config, parallel, pre_process, post_process)
        self.language_model = TransformerLanguageModel(
            config, parallel, pre_process=pre_process, post_process=post_process,
            layer_ids=layer_ids, causal=False, add_pooler=True)
        if post_process:
            # Megatron: torch.nn.Dropout(args.hidden_dropout), then get_linear_layer; seeded
            # per part like BERT's heads (lm_head num_layers + 3, binary_head + 4).
            setattr(self, self.dropout_name, nn.Dropout(config.hidden_dropout))
            with seeded_init(config.init_seed, config.num_layers + 5):
                setattr(self, self.head_name,
                        linear_layer(head_outputs, config.hidden_size, config))

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return False  # no LM head: nothing is tied across pipeline stages

    @classmethod
    def load_policy(cls) -> LoadPolicy:
        """The policy for loading a BERT pretraining checkpoint into this model."""
        return task_head_load_policy(cls.head_name)

    def _encode(self, input_ids, padding_mask, tokentype_ids, token_drop):
        """[rows, s] inputs -> head logits [rows, head_outputs] (last stage) or hidden
        states (other stages)."""
        position_ids = self.default_position_ids(input_ids)
        hidden = self.language_model(input_ids, position_ids, bert_attention_mask(padding_mask),
                                     tokentype_ids=tokentype_ids, token_drop=token_drop)
        if not self.post_process:
            return hidden
        pooled = self.language_model.pooler(hidden)  # [rows, h]
        dropped = getattr(self, self.dropout_name)(pooled)
        return getattr(self, self.head_name)(dropped)


class Classification(PooledHeadModel):
    """Megatron's ``Classification``: [CLS] pooled -> dropout -> ``classification_head``."""

    head_name = "classification_head"
    dropout_name = "classification_dropout"

    def __init__(self, config: TransformerConfig, num_classes: int,
                 parallel: ParallelState = ParallelState(), pre_process: bool = True,
                 post_process: bool = True, layer_ids: Optional[Sequence[int]] = None):
        self.num_classes = num_classes
        super().__init__(config, num_classes, parallel, pre_process, post_process, layer_ids)

    def forward(self, input_ids: Optional[torch.Tensor], padding_mask: torch.Tensor,
                tokentype_ids: Optional[torch.Tensor] = None,
                token_drop: Optional[TokenDropState] = None) -> torch.Tensor:
        """input_ids, padding_mask (1 = real token), tokentype_ids: [b, s] -> logits
        [b, num_classes] on the last stage, hidden states [b, s, h] elsewhere."""
        out = self._encode(input_ids, padding_mask, tokentype_ids, token_drop)
        return out.view(-1, self.num_classes) if self.post_process else out
