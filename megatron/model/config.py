"""The model configuration: only what the transformer needs, validated, flag names in errors."""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.errors import UserError

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope")


#: Fields a checkpoint must share with the model that loads it, and the flag that sets each
#: (a checkpoint saved with another value is refused by name, before its tensors are read).
CHECKPOINT_FIELDS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "ffn_hidden_size": "--ffn-hidden-size",
    "kv_channels": "--kv-channels",
    "padded_vocab_size": "padded vocabulary size",
    "max_position_embeddings": "--max-position-embeddings",
    "position_embedding_type": "--position-embedding-type",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "add_bias_linear": "--disable-bias-linear",
    "apply_residual_connection_post_layernorm": "--apply-residual-connection-post-layernorm",
    "gelu_approximate": "the MLP's GeLU (--openai-gelu / --no-bias-gelu-fusion)",
}


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
    """Dropout on embeddings and on attention/MLP outputs before the add (--hidden-dropout)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities (--attention-dropout)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon (--layernorm-epsilon)."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std/sqrt(2*num_layers) (--init-method-std)."""
    position_embedding_type: str = "learned_absolute"
    """'learned_absolute' (GPT-2) or 'rope' (rotary on q/k) (--position-embedding-type)."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that rotary embeddings rotate (--rotary-percent)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (--rotary-base)."""
    untie_embeddings_and_output_weights: bool = False
    """Own output_layer, not the word embeddings (--untie-embeddings-and-output-weights)."""
    add_bias_linear: bool = True
    """Biases in the QKV, dense and MLP projections (--disable-bias-linear turns them off)."""
    openai_gelu: bool = False
    """The tanh-approximate GeLU (GPT-2's ``gelu_new``) in the MLP and BERT's LM head
    (--openai-gelu)."""
    bias_gelu_fusion: bool = True
    """Megatron's fused bias-GeLU, which computes the tanh approximation; it applies only with
    biases (--no-bias-gelu-fusion turns it off: the exact erf GeLU). See ``gelu_approximate``."""
    params_dtype: torch.dtype = torch.float32
    """Dtype of the parameters: float32, bfloat16 (--bf16) or float16 (--fp16)."""
    recompute_granularity: Optional[str] = None
    """None, or 'full': recompute each layer's activations in backward (--recompute-granularity)."""
    use_flash_attn: bool = False
    """SDPA is always used; True restricts it to its flash kernel (set by code, not by a flag:
    Megatron's --use-flash-attn selects ``attention_backend`` 'sdpa', SDPA's own choice)."""
    attention_backend: str = "auto"
    """Attention kernel (--attention-backend, Megatron-LM's choices mapped in
    ``megatron.compat_flags``): 'auto' picks by device, dropout and mask (SDPA, or on CPU with
    dropout the kernels of ``megatron.model.attention``); 'sdpa' always torch's
    scaled_dot_product_attention; 'core' always Megatron's CoreAttention (``core_attention``)."""
    apply_residual_connection_post_layernorm: bool = False
    """Megatron's post-LN variant, the original BERT: each residual branch starts from the
    LayerNorm's output instead of its input (--apply-residual-connection-post-layernorm)."""
    pack_padded_tokens: bool = True
    """Encoder blocks under a padding mask (BERT) run their layers on the real tokens only,
    packed (``megatron.model.transformer.PackedTokens``); padded positions skip the layers.
    Off (--no-pack-padded-tokens): every layer computes the padded positions too, as
    Megatron-LM does. Real tokens' outputs are the same either way (up to rounding and the
    dropout masks' stream)."""
    num_tokentypes: int = 0
    """Token-type (segment) embeddings rows; 0 for GPT, 2 for BERT with the binary head."""
    sequence_parallel: bool = False
    """Split activations outside the TP regions along the sequence (--sequence-parallel);
    a no-op at tensor-parallel size 1."""
    init_seed: Optional[int] = None
    """When set (--seed), each part's weights (embeddings, layer i, output layer) are drawn from
    a generator seeded by (init_seed, part): the model is the same whatever the pipeline split.
    None: draw from the default generator in construction order."""

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise UserError(msg)

        for flag, value in (("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
                            ("--num-attention-heads", self.num_attention_heads),
                            ("--seq-length", self.seq_length),
                            ("padded vocabulary size", self.padded_vocab_size)):
            need(isinstance(value, int) and value > 0,
                 f"{flag} must be a positive integer, got {value!r}")
        if self.kv_channels is None:
            need(self.hidden_size % self.num_attention_heads == 0,
                 f"--num-attention-heads ({self.num_attention_heads}) must divide --hidden-size "
                 f"({self.hidden_size}) (or set --kv-channels)")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        for flag, value in (("--kv-channels", self.kv_channels),
                            ("--ffn-hidden-size", self.ffn_hidden_size),
                            ("--max-position-embeddings", self.max_position_embeddings),
                            ("--layernorm-epsilon", self.layernorm_epsilon),
                            ("--init-method-std", self.init_method_std),
                            ("--rotary-base", self.rope_theta)):
            need(value > 0, f"{flag} must be positive, got {value}")
        need(self.position_embedding_type in POSITION_EMBEDDING_TYPES,
             f"--position-embedding-type must be one of {', '.join(POSITION_EMBEDDING_TYPES)}, "
             f"got {self.position_embedding_type!r}")
        if self.position_embedding_type == "learned_absolute":
            need(self.seq_length <= self.max_position_embeddings,
                 f"--seq-length ({self.seq_length}) must not exceed --max-position-embeddings "
                 f"({self.max_position_embeddings})")
        for flag, value in (("--hidden-dropout", self.hidden_dropout),
                            ("--attention-dropout", self.attention_dropout)):
            need(0.0 <= value < 1.0, f"{flag} must be in [0, 1), got {value}")
        need(0.0 < self.rotary_percent <= 1.0,
             f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding_type == "rope":
            need(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                 f"--rotary-percent ({self.rotary_percent}) x --kv-channels ({self.kv_channels}) "
                 f"must give an even number of rotated channels, got {self.rotary_dim}")
        need(self.attention_backend in ("auto", "sdpa", "core"),
             f"attention backend must be auto, sdpa or core, got {self.attention_backend!r}")
        need(self.params_dtype in (torch.float32, torch.bfloat16, torch.float16),
             f"params dtype must be float32, bfloat16 (--bf16) or float16 (--fp16), "
             f"got {self.params_dtype}")
        need(self.recompute_granularity in (None, "full"),
             f"--recompute-granularity must be 'full' (or unset), "
             f"got {self.recompute_granularity!r}")
        need(self.num_tokentypes >= 0, f"num_tokentypes must be >= 0, got {self.num_tokentypes}")

    @property
    def gelu_approximate(self) -> str:
        """``F.gelu``'s ``approximate`` for the MLP, as Megatron-LM's ParallelMLP selects it:
        'tanh' with --openai-gelu, or with the (default) bias-GeLU fusion when the MLP has
        biases; otherwise 'none', the exact erf GeLU."""
        tanh = self.openai_gelu or (self.bias_gelu_fusion and self.add_bias_linear)
        return "tanh" if tanh else "none"

    @property
    def lm_head_gelu_approximate(self) -> str:
        """BERT's LM head (Megatron's BertLMHead): 'tanh' with --openai-gelu, else exact."""
        return "tanh" if self.openai_gelu else "none"

    @property
    def rotary_dim(self) -> int:
        """Channels of each head rotated by rope."""
        return int(self.kv_channels * self.rotary_percent)

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise a UserError when the shapes cannot be split across ``tp_size`` ranks."""
        for flag, value in (("--num-attention-heads", self.num_attention_heads),
                            ("--ffn-hidden-size", self.ffn_hidden_size)):
            if value % tp_size:
                raise UserError(f"{flag} ({value}) must be divisible by "
                                f"--tensor-model-parallel-size ({tp_size})")
        if self.padded_vocab_size % tp_size:
            raise UserError(f"padded vocabulary size ({self.padded_vocab_size}) must be divisible "
                            f"by --tensor-model-parallel-size ({tp_size}): the vocabulary is "
                            f"padded to a multiple of --make-vocab-size-divisible-by x "
                            f"--tensor-model-parallel-size")
        if self.sequence_parallel and tp_size > 1 and self.seq_length % tp_size:
            raise UserError(f"--seq-length ({self.seq_length}) must be divisible by "
                            f"--tensor-model-parallel-size ({tp_size}) with --sequence-parallel")
