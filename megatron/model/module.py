"""The base of every model family (GPT, BERT, the finetuning heads): Megatron-core's
LanguageModule, with what GPT and BERT share and nothing that is theirs alone.

It owns:

- the tied embedding: the LM head multiplies by the word-embedding matrix. With pipeline
  parallelism the first stage holds the embedding and the last stage the head, so the last stage
  keeps its own copy (``word_embeddings``, Megatron's ``word_embeddings_for_head``),
  zero-initialised and made equal to the first stage's by ``megatron.parallel.pipeline_utils``;
  ``tied_embedding_weight`` names this rank's half of that pair;
- ``set_input_tensor`` (a non-first pipeline stage starts from received hidden states);
- the language-model logits and loss (vocab-parallel cross entropy);
- the Megatron checkpoint layout of its parameters, for save and load
  (``state_dict_for_save_checkpoint`` / ``load_checkpoint_state``), with a ``LoadPolicy`` that
  says which missing or unexpected keys a load of another model's checkpoint may skip.

Megatron's layout (``state_dict_for_save_checkpoint`` of its models) nests the flat parameter
names: ``language_model.embedding.word_embeddings.weight`` is
``['language_model']['embedding']['word_embeddings']['weight']``, other language-model parts one
level down (``['language_model']['encoder']['layers.0....']``, ``['language_model']['pooler']``,
``['language_model']['output_layer']``), each head one level down (BERT's ``['lm_head']['bias']``,
``['binary_head']['weight']``; the finetuning heads likewise), and the last stage's copy of the
tied embedding is ``['word_embeddings_for_head']['weight']``.
"""

import dataclasses
import fnmatch
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from megatron.errors import UserError
from megatron.model.config import TransformerConfig
from megatron.model.language_model import parallel_lm_logits
from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.layers import VocabParallelEmbedding
from megatron.parallel.state import ParallelState

HEAD_COPY_KEY = "word_embeddings_for_head"  # Megatron's key for the last stage's tied copy


def megatron_model_state(flat: Mapping[str, torch.Tensor]) -> Dict:
    """Flat parameter names -> Megatron's nested ``state_dict_for_save_checkpoint`` layout
    (see the module docstring). Names without a dot stay flat."""
    nested: Dict = {}
    for name, value in flat.items():
        parts = name.split(".")
        if parts[0] == "language_model" and len(parts) > 2:
            module = nested.setdefault("language_model", {})
            if parts[1] == "embedding" and len(parts) > 3:
                module.setdefault("embedding", {}).setdefault(parts[2], {})[
                    ".".join(parts[3:])] = value
            else:
                module.setdefault(parts[1], {})[".".join(parts[2:])] = value
        elif len(parts) > 1:
            key = HEAD_COPY_KEY if parts[0] == "word_embeddings" else parts[0]
            nested.setdefault(key, {})[".".join(parts[1:])] = value
        else:
            nested[name] = value
    return nested


def flat_model_state(state: Mapping) -> Dict[str, torch.Tensor]:
    """The inverse of ``megatron_model_state`` (parameter order kept); also reads flat dicts
    (our checkpoints before the nested layout) and Megatron's older ``transformer`` key."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if not prefix and key == HEAD_COPY_KEY:
                key = "word_embeddings"
            elif prefix == "language_model." and key == "transformer":
                key = "encoder"
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(state, "")
    return flat


@dataclasses.dataclass(frozen=True)
class LoadPolicy:
    """Which keys a checkpoint may lack or hold beyond this model (fnmatch patterns over flat
    parameter names). The default is strict: the checkpoint must match the model exactly.

    Finetuning loads a pretrained checkpoint of another head: e.g. a classifier on a BERT
    checkpoint ignores ``lm_head.*`` and ``binary_head.*`` and initialises
    ``classification_head.*``.
    """

    allow_missing: Tuple[str, ...] = ()
    """Model parameters the checkpoint may lack (they keep their initialisation)."""
    ignore_unexpected: Tuple[str, ...] = ()
    """Checkpoint entries this model has no parameter for (skipped)."""

    @staticmethod
    def _matches(name, patterns):
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def split(self, own: Sequence[str], saved: Sequence[str]):
        """-> (missing allowed, unexpected ignored, missing refused, unexpected refused)."""
        missing = [n for n in own if n not in set(saved)]
        unexpected = [n for n in saved if n not in set(own)]
        ok_missing = [n for n in missing if self._matches(n, self.allow_missing)]
        ok_unexpected = [n for n in unexpected if self._matches(n, self.ignore_unexpected)]
        return (ok_missing, ok_unexpected,
                [n for n in missing if n not in ok_missing],
                [n for n in unexpected if n not in ok_unexpected])


def _describe(names: List[str]) -> str:
    """``3 (lm_head.dense, binary_head)``: how many, and the modules they belong to."""
    modules = []
    for name in names:
        module = name.rsplit(".", 1)[0]
        if module not in modules:
            modules.append(module)
    shown = ", ".join(modules[:6]) + (", ..." if len(modules) > 6 else "")
    return f"{len(names)}" + (f" ({shown})" if names else "")


def load_flat_state(module: nn.Module, flat: Mapping[str, torch.Tensor], where: str,
                    policy: Optional[LoadPolicy] = None) -> Tuple[List[str], List[str]]:
    """Load flat parameter names into ``module`` under ``policy`` (default strict).

    Returns (missing names left at their initialisation, checkpoint names ignored). A key the
    policy does not allow, or a shape that differs, is a one-line UserError naming ``where``.
    """
    policy = policy or LoadPolicy()
    own = module.state_dict()
    ok_missing, ok_unexpected, missing, unexpected = policy.split(list(own), list(flat))
    if missing or unexpected:
        raise UserError(f"checkpoint {where} does not match this model: missing "
                        f"{_describe(missing)}, unexpected {_describe(unexpected)}")
    for name, tensor in flat.items():
        if name in own and tuple(tensor.shape) != tuple(own[name].shape):
            raise UserError(f"checkpoint {where}: parameter {name} has shape "
                            f"{tuple(tensor.shape)} but the model built from the flags has "
                            f"{tuple(own[name].shape)}")
    module.load_state_dict({k: v for k, v in flat.items() if k in own}, strict=not ok_missing)
    return ok_missing, ok_unexpected


class LanguageModule(nn.Module):
    """A language model on one rank: a pipeline stage's part, tensor-parallel shards.

    Subclasses build ``self.language_model`` (a ``TransformerLanguageModel``) and their heads,
    then call ``_init_tied_head()``. ``pre_process``: this stage embeds tokens;
    ``post_process``: it applies the final LayerNorm, the heads and the loss.
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState(),
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        config.check_tensor_parallel(parallel.tp_size)
        self.config = config
        self.parallel = parallel
        self.pre_process = pre_process
        self.post_process = post_process

    # -- tied embedding and pipeline stages ----------------------------------------------------
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return not self.config.untie_embeddings_and_output_weights

    def _init_tied_head(self) -> None:
        """The last stage's copy of the word embeddings for the LM head (pipeline parallelism
        with tied weights): zero here, synchronised from the first stage by the pipeline code,
        which also all-reduces its gradient with the first stage's. Left out of the gradient
        and parameter norms (``shared``), so the tied matrix is counted once."""
        tied = self.share_embeddings_and_output_weights
        config, parallel = self.config, self.parallel
        if self.post_process and tied and not self.pre_process:
            self.word_embeddings = VocabParallelEmbedding(
                config.padded_vocab_size, config.hidden_size, init_method=nn.init.zeros_,
                parallel=parallel, params_dtype=config.params_dtype)
            self.word_embeddings.weight.shared_embedding = True
            self.word_embeddings.weight.shared = True
        if tied and self.pre_process and parallel.pp_size > 1:
            self.language_model.embedding.word_embeddings.weight.shared_embedding = True

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The [V/tp, h] matrix the LM head multiplies by."""
        if not self.share_embeddings_and_output_weights:
            return self.language_model.output_layer.weight
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        return self.word_embeddings.weight

    def tied_embedding_weight(self) -> Optional[torch.Tensor]:
        """This rank's half of the cross-stage tied pair (the word embeddings on the first
        stage, the head's copy on the last stage); None when there is no pair here (pp_size 1,
        untied output layer, or a middle stage)."""
        if self.parallel.pp_size == 1 or not self.share_embeddings_and_output_weights:
            return None
        first = self.parallel.is_first_stage and self.pre_process
        last = self.parallel.is_last_stage and self.post_process
        return self.shared_embedding_or_output_weight() if first or last else None

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """Input hidden states [b, s, h] of a non-first pipeline stage."""
        self.language_model.set_input_tensor(tensor)

    def default_position_ids(self, input_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """0..s-1 for every sample [b, s]; on a non-first stage (``input_ids`` None) sized
        from the received hidden states (a sequence chunk under sequence parallelism)."""
        ref = input_ids if input_ids is not None else self.language_model.input_tensor
        b, s = ref.shape[0], ref.shape[1]
        if input_ids is None and self.config.sequence_parallel:
            s *= self.parallel.tp_size  # the received hidden states are a sequence chunk
        return torch.arange(s, device=ref.device).expand(b, s)

    # -- logits and loss ------------------------------------------------------------------------
    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h] (this rank's [b, s/tp, h] chunk under sequence parallelism) ->
        logits [b, s, V/tp] against the (tied or untied) output weight."""
        return parallel_lm_logits(hidden, self.shared_embedding_or_output_weight(),
                                  self.parallel, sequence_parallel=self.config.sequence_parallel)

    def compute_language_model_loss(self, labels: torch.Tensor,
                                    logits: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [b, s] in fp32 over the vocab-parallel logits. The logits
        must be the caller's alone: the loss reuses them as its softmax buffer."""
        return vocab_parallel_cross_entropy(logits, labels, self.parallel, inplace=True)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict_for_save_checkpoint(self) -> Dict:
        """This rank's parameters in Megatron's nested checkpoint layout."""
        return megatron_model_state(self.state_dict())

    def load_checkpoint_state(self, state: Mapping, where: str,
                              policy: Optional[LoadPolicy] = None):
        """Load Megatron's nested (or a flat) model state; see ``load_flat_state``."""
        return load_flat_state(self, flat_model_state(state), where, policy)

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
