"""GPT as in Megatron-LM: language model + tied (or untied) LM head + vocab-parallel loss."""

from typing import Optional, Sequence

import torch
from torch import nn

from megatron.ltd.dropping import TokenDropState
from megatron.model.config import TransformerConfig
from megatron.model.language_model import TransformerLanguageModel, parallel_lm_logits
from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.layers import VocabParallelEmbedding
from megatron.parallel.state import ParallelState


class GPTModel(nn.Module):
    """Causal language model. Parameter names are Megatron-LM's GPT checkpoint names.

    ``pre_process``: this pipeline stage embeds tokens; ``post_process``: it applies the final
    LayerNorm, the LM head and the loss. ``layer_ids``: global indices of the layers held here.
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState(),
                 pre_process: bool = True, post_process: bool = True,
                 layer_ids: Optional[Sequence[int]] = None):
        super().__init__()
        config.check_tensor_parallel(parallel.tp_size)
        self.config = config
        self.parallel = parallel
        self.pre_process = pre_process
        self.post_process = post_process
        self.language_model = TransformerLanguageModel(
            config, parallel, pre_process=pre_process, post_process=post_process,
            layer_ids=layer_ids, causal=True)
        tied = not config.untie_embeddings_and_output_weights
        if post_process and tied and not pre_process:
            # Last pipeline stage's copy of the word embeddings for the LM head (Megatron's
            # 'word_embeddings_for_head'): zero here, synchronised from the first stage by the
            # pipeline code, whose gradients it all-reduces with the first stage's.
            self.word_embeddings = VocabParallelEmbedding(
                config.padded_vocab_size, config.hidden_size, init_method=nn.init.zeros_,
                parallel=parallel, params_dtype=config.params_dtype)
            self.word_embeddings.weight.shared_embedding = True
            # A copy of the first stage's weights: left out of the gradient norm (Megatron's
            # 'shared'), so the tied embedding is counted once.
            self.word_embeddings.weight.shared = True
        if tied and pre_process and parallel.pp_size > 1:
            self.language_model.embedding.word_embeddings.weight.shared_embedding = True

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """Input hidden states [b, s, h] of a non-first pipeline stage."""
        self.language_model.set_input_tensor(tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The [V/tp, h] matrix the LM head multiplies by."""
        if self.config.untie_embeddings_and_output_weights:
            return self.language_model.output_layer.weight
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        return self.word_embeddings.weight

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
            ref = input_ids if input_ids is not None else self.language_model.input_tensor
            b, s = ref.shape[0], ref.shape[1]
            if input_ids is None and self.config.sequence_parallel:
                s *= self.parallel.tp_size  # the received hidden states are a sequence chunk
            position_ids = torch.arange(s, device=ref.device).expand(b, s)  # [b, s]
        hidden = self.language_model(input_ids, position_ids, attention_mask,
                                     token_drop=token_drop)  # [b, s, h]
        if not self.post_process:
            return hidden
        logits = parallel_lm_logits(hidden, self.shared_embedding_or_output_weight(),
                                    self.parallel,
                                    sequence_parallel=self.config.sequence_parallel)  # [b,s,V/tp]
        if labels is None:
            return logits
        # The logits are ours alone: the loss may reuse them as its softmax buffer.
        return vocab_parallel_cross_entropy(logits, labels, self.parallel, inplace=True)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters held by this rank (a tied matrix counted once). ``exclude_embeddings``
        leaves out word, position and token-type embeddings and the untied output layer."""
        embedding_names = ("word_embeddings", "position_embeddings", "tokentype_embeddings",
                           "output_layer")
        total = 0
        for name, param in self.named_parameters():
            if exclude_embeddings and any(part in embedding_names for part in name.split(".")):
                continue
            total += param.numel()
        return total
