"""Weight-init functions and the FLOPs estimate used for throughput (TFLOP/s, MFU) reporting."""

import contextlib
import math
from typing import Callable, Mapping, Optional

import torch


def init_method_normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """In-place normal(0, std) init (Megatron's init_method_normal)."""
    def init_(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def scaled_init_method_normal(std: float,
                              num_layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """normal(0, std / sqrt(2 * num_layers)) for the projections that write into the residual
    stream (attention dense, mlp dense_4h_to_h), as GPT-2 and Megatron do."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


def _layer_flops(batch_size, tokens, hidden_size, ffn_hidden_size, passes):
    # Per token forward: QKV 6h^2 + dense 2h^2 + MLP 4*h*ffn (= 24h^2 with ffn = 4h) FLOPs
    # (2 per multiply-add), plus attention scores and context 4*tokens*h (Megatron counts the full
    # square, not the causal half).
    dense = 2 * (4 * hidden_size * hidden_size + 2 * hidden_size * ffn_hidden_size)
    attention = 4 * tokens * hidden_size
    return passes * batch_size * tokens * (dense + attention)


def gpt_flops_per_iteration(batch_size: int, seq_length: int, num_layers: int, hidden_size: int,
                            vocab_size: int, *, recompute: bool = False,
                            kept_length: Optional[int] = None,
                            kept_lengths: Optional[Mapping[int, int]] = None,
                            ffn_hidden_size: Optional[int] = None) -> float:
    """Model FLOPs of one iteration of ``batch_size`` sequences (forward + backward).

    With ffn = 4h this is Megatron's formula (Narayanan et al. 2021, eq. 3):
    72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h)) without recompute and
    96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)) with full recompute (the layers' forward runs twice,
    the LM head's once). Under random-LTD a dropping layer is counted at its kept length r,
    quadratic term included: ``kept_lengths`` maps layer ids to r (the others run at full
    length); ``kept_length`` is the common case, every layer but the first and the last at r.
    """
    ffn = 4 * hidden_size if ffn_hidden_size is None else ffn_hidden_size
    passes = 4 if recompute else 3  # forward + backward (2x forward) [+ recomputed forward]
    if kept_lengths is None:
        middle = range(1, num_layers - 1) if kept_length is not None else ()
        kept_lengths = {layer: kept_length for layer in middle}
    layers = sum(_layer_flops(batch_size, min(kept_lengths.get(layer, seq_length), seq_length),
                              hidden_size, ffn, passes) for layer in range(num_layers))
    lm_head = 3 * 2 * batch_size * seq_length * hidden_size * vocab_size
    return float(layers + lm_head)


def gpt_flops_per_token(seq_length: int, num_layers: int, hidden_size: int, vocab_size: int,
                        **kwargs) -> float:
    """``gpt_flops_per_iteration`` for one sequence divided by its ``seq_length`` tokens."""
    return gpt_flops_per_iteration(1, seq_length, num_layers, hidden_size, vocab_size,
                                   **kwargs) / seq_length


@contextlib.contextmanager
def seeded_init(seed: Optional[int], part: int):
    """Initialise the parameters created inside from a generator seeded by (seed, part), leaving
    the default CPU generator as it was; a no-op when ``seed`` is None. Parameters are created
    on the CPU, so only the CPU generator is involved."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((int(seed) * 1_000_003 + int(part)) % (2 ** 63))
        yield
