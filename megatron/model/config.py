"""The model configuration: only what the transformer needs, validated, flag names in errors."""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.errors import UserError

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope")


@dataclass
class TransformerConfig:
    """Shape and regularisation of a Megatron GPT/BERT transformer (one field per Megatron flag)."""

    num_layers: int
    """Number of transformer layers (--num-layers)."""
    hidden_size: int
    """Width of the residual stream (--hidden-size)."""
    num_attention_heads: int
    """Attention heads per layer (--num-attention-heads)."""
    seq_length: int
    """Training sequence length (--seq-length)."""
    padded_vocab_size: int
    """Vocabulary size padded to a multiple of 128 x TP (Megatron's args.padded_vocab_size)."""
    max_position_embeddings: Optional[int] = None
    """Rows of the learned position table; None -> seq_length (--max-position-embeddings)."""
    ffn_hidden_size: Optional[int] = None
    """Inner width of the MLP; None -> 4 * hidden_size (--ffn-hidden-size)."""
    kv_channels: Optional[int] = None
    """Width of one attention head; None -> hidden_size // num_attention_heads (--kv-channels)."""
    hidden_dropout: float = 0.1
    """Dropout on the embeddings and on attention/MLP outputs before the residual add (--hidden-dropout)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities (--attention-dropout)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon (--layernorm-epsilon)."""
    init_method_std: float = 0.02
    """Std of the normal weight init; output projections use std / sqrt(2 * num_layers) (--init-method-std)."""
    position_embedding_type: str = "learned_absolute"
    """'learned_absolute' (GPT-2) or 'rope' (rotary on q/k) (--position-embedding-type)."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that rotary embeddings rotate (--rotary-percent)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (--rotary-base)."""
    untie_embeddings_and_output_weights: bool = False
    """Separate output_layer instead of reusing the word embeddings (--untie-embeddings-and-output-weights)."""
    add_bias_linear: bool = True
    """Biases in the QKV, dense and MLP projections (--disable-bias-linear turns them off)."""
    params_dtype: torch.dtype = torch.float32
    """Dtype of the parameters: float32, bfloat16 (--bf16) or float16 (--fp16)."""
    recompute_granularity: Optional[str] = None
    """None, or 'full': recompute each layer's activations in backward (--recompute-granularity)."""
    use_flash_attn: bool = False
    """Restrict scaled_dot_product_attention to its flash kernel (--use-flash-attn); SDPA is always used."""
    num_tokentypes: int = 0
    """Token-type (segment) embeddings rows; 0 for GPT, 2 for BERT."""

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise UserError(msg)

        for flag, value in (("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
                            ("--num-attention-heads", self.num_attention_heads),
                            ("--seq-length", self.seq_length)):
            need(isinstance(value, int) and value > 0, f"{flag} must be a positive integer, got {value!r}")
        need(self.padded_vocab_size > 0, f"padded vocabulary size must be positive, got {self.padded_vocab_size}")
        if self.kv_channels is None:
            need(self.hidden_size % self.num_attention_heads == 0,
                 f"--num-attention-heads ({self.num_attention_heads}) must divide --hidden-size "
                 f"({self.hidden_size}) (or set --kv-channels)")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        need(self.kv_channels > 0, f"--kv-channels must be positive, got {self.kv_channels}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        need(self.ffn_hidden_size > 0, f"--ffn-hidden-size must be positive, got {self.ffn_hidden_size}")
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        need(self.position_embedding_type in POSITION_EMBEDDING_TYPES,
             f"--position-embedding-type must be one of {', '.join(POSITION_EMBEDDING_TYPES)}, "
             f"got {self.position_embedding_type!r}")
        if self.position_embedding_type == "learned_absolute":
            need(self.seq_length <= self.max_position_embeddings,
                 f"--seq-length ({self.seq_length}) must not exceed --max-position-embeddings "
                 f"({self.max_position_embeddings})")
        need(0.0 <= self.hidden_dropout < 1.0, f"--hidden-dropout must be in [0, 1), got {self.hidden_dropout}")
        need(0.0 <= self.attention_dropout < 1.0,
             f"--attention-dropout must be in [0, 1), got {self.attention_dropout}")
        need(self.layernorm_epsilon > 0, f"--layernorm-epsilon must be positive, got {self.layernorm_epsilon}")
        need(self.init_method_std > 0, f"--init-method-std must be positive, got {self.init_method_std}")
        need(0.0 < self.rotary_percent <= 1.0, f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope":
            rot = int(self.kv_channels * self.rotary_percent)
            need(rot >= 2 and rot % 2 == 0,
                 f"--rotary-percent ({self.rotary_percent}) x --kv-channels ({self.kv_channels}) "
                 f"must give an even number of rotated channels, got {rot}")
        need(self.rope_theta > 0, f"--rotary-base must be positive, got {self.rope_theta}")
        need(self.params_dtype in (torch.float32, torch.bfloat16, torch.float16),
             f"params dtype must be float32, bfloat16 (--bf16) or float16 (--fp16), got {self.params_dtype}")
        need(self.recompute_granularity in (None, "full"),
             f"--recompute-granularity must be 'full' (or unset), got {self.recompute_granularity!r}")
        need(self.num_tokentypes >= 0, f"num_tokentypes must be >= 0, got {self.num_tokentypes}")

    @property
    def rotary_dim(self) -> int:
        """Channels of each head rotated by rope."""
        return int(self.kv_channels * self.rotary_percent)

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise a UserError when the shapes cannot be split across ``tp_size`` ranks."""
        for flag, value in (("--num-attention-heads", self.num_attention_heads),
                            ("--ffn-hidden-size", self.ffn_hidden_size),
                            ("padded vocabulary size", self.padded_vocab_size)):
            if value % tp_size:
                raise UserError(f"{flag} ({value}) must be divisible by "
                                f"--tensor-model-parallel-size ({tp_size})")
