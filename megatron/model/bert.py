"""BERT as in Megatron-LM: word + position + token-type embeddings, a bidirectional encoder with
the padding mask, the masked-LM head (tied to the word embeddings, with a bias) and, with the
binary head, the pooler and the sentence-order head.

Parameter names and checkpoint layout are Megatron's (``language_model.{embedding,encoder,
pooler}``, ``lm_head.{dense,layernorm,bias}``, ``binary_head``, ``word_embeddings_for_head``),
so Megatron-LM's BERT checkpoints load here and ours there. Pre-LN by default, Megatron's
post-LN (the original BERT) with ``config.apply_residual_connection_post_layernorm``.

random-LTD drops tokens in the middle layers exactly as for GPT (layout-invariant kept indices);
the padding mask is gathered with the kept tokens, so no kept token attends to padding. The
masked-LM loss is taken after the last, full layer, over every masked position.

SCTD (``megatron.ltd.sctd``): given an ``SCTDDrop`` in training, one forward runs both the
full-sequence pass and the token-dropped pass (the embedding once, then this stage's layers
twice); a non-last pipeline stage returns and receives both as one doubled batch ``[2b, s, h]``
(full first), the last stage returns an ``SCTDOutput`` with both passes' MLM losses, binary
logits and the [CLS] hidden states of the last layer and of the input to the last layer.
"""

from typing import Optional, Sequence, Tuple, Union

import torch

from megatron.ltd.dropping import TokenDropState
from megatron.ltd.sctd import SCTDDrop, SCTDOutput
from megatron.model.config import TransformerConfig
from megatron.model.heads import BertLMHead, linear_layer
from megatron.model.language_model import TransformerLanguageModel
from megatron.model.module import LanguageModule
from megatron.model.transformer import layer_call_packing
from megatron.model.utils import seeded_init
from megatron.parallel.state import ParallelState


def bert_attention_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """padding_mask [b, s] (1 = real token) -> bool [b, 1, 1, s], True = masked out: every
    query attends to the sample's real tokens only (padded queries' outputs never reach the
    loss)."""
    return (padding_mask < 0.5).view(padding_mask.size(0), 1, 1, padding_mask.size(1))


class BertModel(LanguageModule):
    """Megatron's BERT on one rank (a pipeline stage's layers, tensor-parallel shards).

    ``add_binary_head``: the pooler and the two-way sentence-order head (``--bert-no-binary-head``
    drops them; the token-type embeddings go with them, as in Megatron, where
    ``num_tokentypes`` is 2 with the binary head and 0 without).
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState(),
                 pre_process: bool = True, post_process: bool = True,
                 layer_ids: Optional[Sequence[int]] = None, add_binary_head: bool = True):
        super().__init__(config, parallel, pre_process, post_process)
        self.add_binary_head = add_binary_head
        self.language_model = TransformerLanguageModel(
            config, parallel, pre_process=pre_process, post_process=post_process,
            layer_ids=layer_ids, causal=False, add_pooler=add_binary_head)
        if post_process:
            with seeded_init(config.init_seed, config.num_layers + 3):
                self.lm_head = BertLMHead(config, parallel)
            if add_binary_head:
                with seeded_init(config.init_seed, config.num_layers + 4):
                    self.binary_head = linear_layer(2, config.hidden_size, config)
        self._init_tied_head()
        self._penultimate = None  # SCTD: a list collecting the last layer's input while set
        if post_process:  # this stage holds the last layer: watch its input
            self.language_model.encoder.layers[-1].register_forward_pre_hook(
                self._capture_penultimate)

    supports_sctd = True
    """The training loop may hand this model SCTD's dual-pass state."""

    def _capture_penultimate(self, module, args):
        # Fires on the layer's forward (and again under full recompute in backward, when no
        # capture is armed).
        if self._penultimate is not None:
            hidden, packed = args[0], layer_call_packing(args)
            if packed is not None:  # the real tokens only (PackedTokens): back to [b, s, h]
                hidden = packed.unpack(hidden)
            self._penultimate.append(hidden)

    def _cls(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, s, h] (or this rank's sequence-parallel chunk) -> the [CLS] row [b, h]."""
        if self.config.sequence_parallel and self.parallel.tp_size > 1:
            from megatron.parallel.mappings import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, self.parallel,
                                                          output_grad_is_partial=False)
        return hidden[:, 0, :]

    def _heads(self, hidden, lm_labels):
        binary_logits = None
        if self.add_binary_head:
            binary_logits = self.binary_head(self.language_model.pooler(hidden))  # [b, 2]
        logits = self.lm_logits(self.lm_head.transform(hidden)) + self.lm_head.bias  # [b,s,V/tp]
        if lm_labels is None:
            return logits, binary_logits
        # Positions outside the loss mask carry -1: any valid id serves there (masked out).
        labels = lm_labels.clamp(min=0)
        return self.compute_language_model_loss(labels, logits), binary_logits

    def _forward_sctd(self, input_ids, position_ids, attention_mask, tokentype_ids, lm_labels,
                      drop: TokenDropState):
        """SCTD's dual step: the full pass, then the dropped pass (module docstring)."""
        lm = self.language_model
        if lm.pre_process:
            embedded = lm.embedding(input_ids, position_ids, tokentype_ids)
            full_in = drop_in = embedded
        else:
            if lm.input_tensor is None:
                raise RuntimeError("a non-first pipeline stage needs set_input_tensor() first")
            full_in, drop_in = lm.input_tensor.chunk(2, dim=0)
        captured = []
        self._penultimate = captured if self.post_process else None
        try:
            full = lm.encoder(full_in, position_ids, attention_mask, token_drop=None)
            dropped = lm.encoder(drop_in, position_ids, attention_mask, token_drop=drop)
        finally:
            self._penultimate = None
        if not self.post_process:
            return torch.cat([full, dropped], dim=0)
        full_lm, full_binary = self._heads(full, lm_labels)
        drop_lm, drop_binary = self._heads(dropped, lm_labels)
        if len(captured) != 2:
            raise RuntimeError(f"SCTD: captured {len(captured)} inputs of the last layer, "
                               "expected 2 (one per pass)")
        return SCTDOutput(drop_lm, drop_binary, full_lm, full_binary,
                          self._cls(full), self._cls(captured[0]),
                          self._cls(dropped), self._cls(captured[1]))

    def forward(self, input_ids: Optional[torch.Tensor], padding_mask: torch.Tensor,
                tokentype_ids: Optional[torch.Tensor] = None,
                lm_labels: Optional[torch.Tensor] = None,
                token_drop: Optional[TokenDropState] = None
                ) -> Union[Tuple[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        """input_ids, padding_mask (1 = real token), tokentype_ids, lm_labels: [b, s];
        ``lm_labels`` -1 (or anything) where the loss mask is 0. ``token_drop``: random-LTD for
        this micro-batch (training mode only); an ``SCTDDrop``: SCTD's dual step (see the module
        docstring; the last stage then returns an ``SCTDOutput``).

        Last stage: (per-token MLM loss [b, s] in fp32 when ``lm_labels`` are given, else the
        logits [b, s, V/tp]; binary-head logits [b, 2] or None). Other stages: the hidden
        states [b, s, h] ([b, s / tp, h] with sequence parallelism).
        """
        position_ids = self.default_position_ids(input_ids)  # [b, s]
        attention_mask = bert_attention_mask(padding_mask)
        if isinstance(token_drop, SCTDDrop):
            if self.training:
                return self._forward_sctd(input_ids, position_ids, attention_mask,
                                          tokentype_ids, lm_labels, token_drop.drop)
            token_drop = None  # evaluation never drops (nor runs two passes)
        hidden = self.language_model(input_ids, position_ids, attention_mask,
                                     tokentype_ids=tokentype_ids, token_drop=token_drop)
        if not self.post_process:
            return hidden
        return self._heads(hidden, lm_labels)
