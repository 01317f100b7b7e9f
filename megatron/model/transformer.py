"""The transformer of Megatron-LM's GPT/BERT: attention, MLP, pre-LayerNorm layer, and the block.

Activations are batch-first, ``[b, s, h]``, everywhere (Megatron uses [s, b, h]; we use
``torch.nn.functional.scaled_dot_product_attention``, whose layout is [b, heads, s, head_dim], so
batch-first avoids transposes around it; on CPU with attention dropout, where SDPA has no
fused kernel, ``megatron.model.attention``'s block-causal kernel, or for BERT's padding masks
its padding kernel, takes its place). Every
projection is a Column/RowParallelLinear: under tensor parallelism each rank holds
``num_attention_heads / tp`` heads and ``ffn / tp`` MLP channels, and nothing here changes.

Attention masks follow Megatron's convention: a boolean tensor broadcastable to [b, 1, s, s]
where True means "masked out" (may not attend).

Dropout and tensor parallelism (Megatron's semantics): the attention-probability dropout acts on
this rank's heads, so it draws from the RNG tracker's 'model-parallel-rng' state (seeded
seed + 2718 + tp_rank, different on every TP rank); hidden and embedding dropout act on
activations replicated across TP ranks and draw from the default generator (same seed, same mask
on every rank). Consequence: with --attention-dropout > 0 a TP=2 run does not bit-match the TP=1
run (one [b, heads, s, s] mask from one stream vs two half masks from two streams), exactly as in
Megatron; TP equivalence holds with attention dropout 0.

Sequence parallelism (``config.sequence_parallel``): between the TP regions the residual stream
is this rank's sequence chunk [b, s / tp, h] (dim 1, as we are batch-first); the QKV and h_to_4h
projections all-gather it, the dense and 4h_to_h projections reduce-scatter back to chunks, and
the LayerNorms and row-parallel biases (tagged ``sequence_parallel``) see only this rank's tokens.
Hidden dropout then acts on different tokens on each rank, so, as in Megatron, the whole block
runs inside the tracker's tensor-parallel RNG state (and attention dropout does not fork again).
Position ids and masks passed to a layer always describe the full sequence.
"""

import contextlib
import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.errors import UserError
from megatron.ltd.dropping import (TokenDropState, flat_token_indices, gather_attention_mask,
                                   gather_position_ids, gather_tokens, kept_indices_by_layer,
                                   scatter_tokens)
from megatron.model.attention import (causal_attention_with_dropout, core_attention,
                                      padding_attention_with_dropout,
                                      varlen_attention_with_dropout)
from megatron.model.config import TransformerConfig
from megatron.model.utils import init_method_normal, scaled_init_method_normal, seeded_init
from megatron.parallel.layers import (ColumnParallelLinear, RowParallelLinear, divide,
                                      mark_sequence_parallel)
from megatron.parallel.mappings import (gather_from_sequence_parallel_region,
                                        scatter_to_sequence_parallel_region)
from megatron.parallel.random import tp_region_rng
from megatron.parallel.state import ParallelState


def rotary_cos_sin(position_ids: torch.Tensor, dim: int, theta: float,
                   dtype: torch.dtype = torch.float32):
    """cos and sin tables ``[b, 1, r, dim]`` for the given positions ``[b, r]``, computed in
    ``dtype``: fp32 (as Megatron's RotaryEmbedding, whose frequencies are fp32) for fp32, bf16
    and fp16 models; float64 only for float64 reference computations.

    Megatron's non-interleaved rotary layout: frequencies theta^(-2i/dim), duplicated halves.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype,
                                             device=position_ids.device) / dim))  # [dim/2]
    freqs = position_ids.to(dtype).unsqueeze(-1) * inv_freq  # [b, r, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [b, 1, r, dim]
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.size(-1)`` channels of ``t [b, np, r, hn]``; the rest pass.
    Computed in cos's dtype (fp32 for half-precision ``t``), cast back to ``t``'s dtype."""
    rot = cos.size(-1)
    t_rot, t_pass = t[..., :rot].to(cos.dtype), t[..., rot:]
    x1, x2 = t_rot.chunk(2, dim=-1)  # each [b, np, r, rot/2]
    rotated = torch.cat((-x2, x1), dim=-1)  # [b, np, r, rot]
    out = (t_rot * cos + rotated * sin).to(t.dtype)
    return torch.cat((out, t_pass), dim=-1) if t_pass.numel() else out


class LayerNorm(nn.LayerNorm):
    """LayerNorm with Megatron's parameter names (weight, bias), ones/zeros init.

    torch's kernels accumulate the statistics in fp32 for bf16/fp16 inputs (like apex's mixed
    fused LayerNorm Megatron uses); under autocast layer_norm runs in fp32.
    """

    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype,
                 sequence_parallel: bool = False):
        super().__init__(hidden_size, eps=eps, dtype=params_dtype)
        if sequence_parallel:  # sees only this rank's tokens: grads all-reduced over TP
            mark_sequence_parallel(self.weight)
            mark_sequence_parallel(self.bias)


def _layer_norm(config: TransformerConfig) -> LayerNorm:
    return LayerNorm(config.hidden_size, config.layernorm_epsilon, config.params_dtype,
                     config.sequence_parallel)


@dataclasses.dataclass
class PackedTokens:
    """The real tokens of a batch under a padding mask, packed: row ``k`` of the packed hidden
    states ``[1, N, h]`` is row ``index[k]`` of the flattened ``[b * s, h]`` batch, the samples
    one after another (each sample's tokens contiguous, in position order).

    BERT's batches are padded to the sequence length: finetuning batches (MNLI, QQP) are mostly
    padding and a pretraining batch a fifth or more. Every part of a layer but attention works
    row by row (LayerNorms, projections, GeLU, dropout, residuals), so the block runs them on the
    N real rows only; attention stays per sample (``ParallelAttention`` on packed rows). Padded
    positions skip the layers (they keep the block's input), so their outputs differ from a
    layer that computes them; nothing reads them (the MLM loss and the pooler look at real
    tokens only). The real tokens' outputs are those of the padded layer. A random-LTD layer's
    kept tokens, gathered with their columns of the padding mask, are a padded batch too: the
    block packs the real ones among them the same way.
    """

    index: torch.Tensor
    """[N] rows of the flattened [b * s] batch holding real tokens, ascending."""
    batch: int
    seq: int
    position_ids: torch.Tensor
    """[1, N] the real tokens' position ids (the given ones, or their index in the sample)."""
    bounds: Tuple[Tuple[int, int], ...]
    """(start, end) packed rows of each sample with at least one real token."""

    @classmethod
    def from_padding_mask(cls, attention_mask: torch.Tensor, batch: int,
                          position_ids: Optional[torch.Tensor]) -> Optional["PackedTokens"]:
        """For a padding mask bool [b|1, 1, 1, s] (True = padded): the packing, or None when
        no position is padded (packing would only cost copies)."""
        seq = attention_mask.size(-1)
        real = ~attention_mask.view(-1, seq).expand(batch, seq)  # [b, s]
        counts = real.sum(dim=1).tolist()  # one host sync per forward
        if sum(counts) == batch * seq:
            return None
        index = real.reshape(-1).nonzero().view(-1)
        if position_ids is None:
            position_ids = torch.arange(seq, device=index.device)
        position_ids = position_ids.expand(batch, seq).reshape(-1)[index].view(1, -1)
        bounds, start = [], 0
        for n in counts:
            if n:
                bounds.append((start, start + n))
            start += n
        return cls(index, batch, seq, position_ids, tuple(bounds))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[b, s, ...] -> the real rows [1, N, ...]."""
        flat = padded.reshape(self.batch * self.seq, *padded.shape[2:])
        return flat.index_select(0, self.index).unsqueeze(0)

    def unpack(self, packed: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[1, N, ...] -> [b, s, ...]: the real rows from ``packed``, the padded rows from
        ``base`` (zeros when None). Out of place, like ``scatter_tokens``."""
        tail = packed.shape[2:]
        if base is None:
            flat = packed.new_zeros(self.batch * self.seq, *tail)
        else:
            flat = base.to(packed.dtype).reshape(self.batch * self.seq, *tail)
        return flat.index_copy(0, self.index, packed[0]).view(self.batch, self.seq, *tail)


def layer_call_packing(args) -> Optional[PackedTokens]:
    """For a forward (pre-)hook on a ``ParallelTransformerLayer``: the ``PackedTokens`` its call
    got (the block passes it as the 5th positional input), or None when the layer ran on the
    padded batch."""
    return args[4] if len(args) > 4 else None


class ParallelAttention(nn.Module):
    """Self-attention: fused QKV projection, (rope), SDPA (or the CPU kernels of
    ``megatron.model.attention`` for dropout on CPU), output projection.

    ``query_key_value.weight`` rows are laid out per head as [q_j; k_j; v_j] (Megatron checkpoint
    version 3, [np, 3, hn] ordering), so a TP rank's row slice holds whole heads.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 parallel: ParallelState = ParallelState(), causal: bool = True):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.parallel = parallel
        self.causal = causal
        self.head_dim = config.kv_channels
        self.heads_per_partition = divide(config.num_attention_heads, parallel.tp_size,
                                          "--num-attention-heads")
        projection = config.kv_channels * config.num_attention_heads
        init = init_method_normal(config.init_method_std)
        out_init = scaled_init_method_normal(config.init_method_std, config.num_layers)
        sp = config.sequence_parallel
        self.query_key_value = ColumnParallelLinear(
            config.hidden_size, 3 * projection, bias=config.add_bias_linear, gather_output=False,
            init_method=init, parallel=parallel, params_dtype=config.params_dtype,
            sequence_parallel=sp)
        self.dense = RowParallelLinear(
            projection, config.hidden_size, bias=config.add_bias_linear, input_is_parallel=True,
            init_method=out_init, parallel=parallel, params_dtype=config.params_dtype,
            sequence_parallel=sp)

    def forward(self, hidden: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                query_indices: Optional[torch.Tensor] = None,
                packed: Optional[PackedTokens] = None) -> torch.Tensor:
        """hidden [b, r, h] -> [b, r, h]. ``query_indices`` [b, r_q] (ascending positions of
        the sequence): only those tokens are queries, every token a key/value; the output is
        [b, r_q, h] (TokenBypass's query layer). The fused QKV projection still runs on all r
        tokens (one projection; the dropped tokens' query rows are discarded).

        ``packed``: hidden is the real tokens [1, N, h] of a batch whose padding mask (and
        full position ids) are ``attention_mask`` and ``position_ids``. On CPU with dropout the
        packed kernel attends within each sample; otherwise q, k and v are unpacked to
        [b, s] for the kernels below and the context packed again."""
        np_, hn = self.heads_per_partition, self.head_dim
        # Under sequence parallelism hidden is [b, r / tp, h]; the projection all-gathers it.
        mixed = self.query_key_value(hidden)  # [b, r, np * 3 * hn]
        dropout_p = self.config.attention_dropout if self.training else 0.0
        backend = self.config.attention_backend
        cpu_dropout = dropout_p > 0 and mixed.device.type == "cpu" \
            and not self.config.use_flash_attn and backend == "auto"
        varlen = packed is not None and cpu_dropout and query_indices is None
        if varlen:
            position_ids = packed.position_ids
        elif packed is not None:
            mixed = packed.unpack(mixed)  # [b, s, np * 3 * hn], padded rows zero
        b, r = mixed.shape[0], mixed.shape[1]
        mixed = mixed.view(b, r, np_, 3 * hn)  # [b, r, np, 3 * hn]
        q, k, v = mixed.split(hn, dim=-1)  # each [b, r, np, hn]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each [b, np, r, hn]

        if self.config.position_embedding_type == "rope":
            if position_ids is None:
                position_ids = torch.arange(r, device=hidden.device).expand(b, r)  # [b, r]
            cos, sin = rotary_cos_sin(position_ids, self.config.rotary_dim,
                                      self.config.rope_theta,
                                      torch.promote_types(q.dtype, torch.float32))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if query_indices is not None:
            q, attention_mask = _query_rows(q, attention_mask, query_indices, self.causal)
        if attention_mask is not None:
            mask, is_causal = ~attention_mask, False  # SDPA's boolean mask: True = attend
        else:
            mask, is_causal = None, self.causal
        # Attention probabilities belong to this rank's heads: under TP they need a per-rank mask.
        # (Under sequence parallelism the block already runs in that RNG state.)
        fork = dropout_p > 0 and not self.config.sequence_parallel
        rng = tp_region_rng(self.parallel) if fork else contextlib.nullcontext()
        kernel = contextlib.nullcontext()
        if self.config.use_flash_attn:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            kernel = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        with rng, kernel:
            if varlen:  # packed real tokens: each sample's queries over its own keys
                context = varlen_attention_with_dropout(q, k, v, dropout_p, packed.bounds)
            elif backend == "core":  # --attention-backend unfused/local: Megatron's CoreAttention
                context = core_attention(q, k, v, mask, is_causal, dropout_p)
            elif cpu_dropout and _masks_the_future(attention_mask, is_causal):
                # SDPA has no fused CPU kernel with dropout; this one skips the masked future
                context = causal_attention_with_dropout(q, k, v, dropout_p,
                                                        mask=attention_mask)
            elif cpu_dropout and _is_padding_mask(attention_mask) and query_indices is None:
                # BERT's padding mask: no fused CPU kernel either; this one skips padded keys
                context = padding_attention_with_dropout(q, k, v, dropout_p, attention_mask)
            elif cpu_dropout and q.dtype == torch.bfloat16:
                context = core_attention(q, k, v, mask, is_causal, dropout_p)
            else:
                context = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p,
                    is_causal=is_causal)  # [b, np, r, hn]
        r_q = q.size(2)
        context = context.transpose(1, 2).reshape(b, r_q, np_ * hn)  # [b, r_q, np * hn]
        if packed is not None and not varlen:
            context = packed.pack(context)  # [1, N, np * hn]
        return self.dense(context)  # [b, r_q, h] ([b, r_q / tp, h] sequence-parallel)


def _query_rows(q: torch.Tensor, attention_mask: Optional[torch.Tensor],
                query_indices: torch.Tensor, causal: bool):
    """The query rows ``q[:, :, query_indices]`` [b, np, r_q, hn] and the mask of those queries
    over all keys: a padding mask [b|1, 1, 1, s] as is, the rows of an explicit [b|1, 1, s, s]
    mask, or for causal attention without a mask the explicit [b, 1, r_q, s] "key after query"
    mask (SDPA's is_causal would align the r_q queries with the first r_q keys)."""
    b, heads, s, hn = q.shape
    r_q = query_indices.size(1)
    q = q.gather(2, query_indices.view(b, 1, r_q, 1).expand(b, heads, r_q, hn))
    if attention_mask is None:
        if causal:
            keys = torch.arange(s, device=q.device)
            attention_mask = (keys.view(1, 1, 1, s) > query_indices.view(b, 1, r_q, 1))
    elif attention_mask.size(-2) == s and s > 1:
        attention_mask = attention_mask.expand(b, *attention_mask.shape[1:])
        attention_mask = attention_mask.gather(
            2, query_indices.view(b, 1, r_q, 1).expand(b, attention_mask.size(1), r_q, s))
    return q, attention_mask


def _masks_the_future(attention_mask: Optional[torch.Tensor], is_causal: bool) -> bool:
    """Whether attention is causal: the layer's default causal mask, or an explicit mask (True =
    masked out) that hides every later key from every query, as GPT's --reset-attention-mask
    masks and random-LTD's gathered rows and columns of them do."""
    if attention_mask is None:
        return is_causal
    r_q, r_k = attention_mask.shape[-2:]
    if r_q != r_k:
        return False  # a padding mask [b, 1, 1, s]: not causal
    future = torch.ones(r_q, r_k, dtype=torch.bool, device=attention_mask.device).triu_(1)
    return bool((attention_mask >= future).all())


def _is_padding_mask(attention_mask: Optional[torch.Tensor]) -> bool:
    """Whether the mask is a padding mask: bool [b|1, 1, 1, r] (True = masked out), one row of
    key columns per sample, as BertModel (and random-LTD's gathered columns of it) pass."""
    return attention_mask is not None and attention_mask.dtype == torch.bool \
        and attention_mask.dim() == 4 and attention_mask.size(1) == 1 \
        and attention_mask.size(2) == 1


class ParallelMLP(nn.Module):
    """h -> ffn (column parallel) -> GeLU -> h (row parallel).

    The GeLU is Megatron-LM's (``config.gelu_approximate``): --openai-gelu, or with biases its
    fused bias-gelu (``bias_gelu_impl``, on by default), is the tanh approximation; with
    --no-bias-gelu-fusion or --disable-bias-linear (which turns the fusion off) ``F.gelu``,
    the exact erf GeLU.
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState()):
        super().__init__()
        self.gelu_approximate = config.gelu_approximate
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size, config.ffn_hidden_size, bias=config.add_bias_linear,
            gather_output=False, init_method=init_method_normal(config.init_method_std),
            parallel=parallel, params_dtype=config.params_dtype,
            sequence_parallel=config.sequence_parallel)
        self.dense_4h_to_h = RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear,
            input_is_parallel=True,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            parallel=parallel, params_dtype=config.params_dtype,
            sequence_parallel=config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = F.gelu(self.dense_h_to_4h(hidden),
                       approximate=self.gelu_approximate)  # [b, r, ffn / tp]
        return self.dense_4h_to_h(inner)  # [b, r, h]


class ParallelTransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + drop(attn(ln(x))), then + drop(mlp(ln(.))).

    With ``config.apply_residual_connection_post_layernorm`` (Megatron's post-LN, the original
    BERT) each residual starts from the LayerNorm's output: y = ln1(x) + drop(attn(ln1(x))),
    then ln2(y) + drop(mlp(ln2(y))). With the block's final LayerNorm this is exactly BERT's
    post-LN stack: layer i's ``input_layernorm`` plays the part of BERT's embedding LayerNorm
    (i = 0) or of layer i-1's output LayerNorm.

    ``layer_number`` is the global 0-based index of the layer in the whole model (pipeline
    stages hold slices; random-LTD keeps the first and the last layer dense).
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 parallel: ParallelState = ParallelState(), causal: bool = True):
        super().__init__()
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout
        self.post_ln = config.apply_residual_connection_post_layernorm
        self.input_layernorm = _layer_norm(config)
        self.self_attention = ParallelAttention(config, layer_number, parallel, causal)
        self.post_attention_layernorm = _layer_norm(config)
        self.mlp = ParallelMLP(config, parallel)
        self._config, self._parallel = config, parallel

    def _kept_rows(self, x, indices):
        return _kept_rows_of(x, indices, self._config, self._parallel)

    def forward(self, hidden: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                query_indices: Optional[torch.Tensor] = None,
                packed: Optional[PackedTokens] = None) -> torch.Tensor:
        """hidden [b, r, h], position_ids [b, r] | None, attention_mask [b|1, 1, r, r] | None.
        ``query_indices`` [b, r_q]: the query-layer mode (TokenBypass's layer L/2-1): those
        tokens are the queries, all r tokens the keys/values, and the output is theirs only,
        [b, r_q, h] (the residual stream and the MLP run on them only). ``packed``: hidden is
        the real tokens [1, N, h] of the padded batch that ``attention_mask`` (a padding mask)
        and ``position_ids`` describe; so is the output."""
        normed = self.input_layernorm(hidden)
        attn = self.self_attention(normed, position_ids, attention_mask, query_indices, packed)
        residual = normed if self.post_ln else hidden
        if query_indices is not None:
            residual = self._kept_rows(residual, query_indices)
        hidden = residual + F.dropout(attn, self.hidden_dropout, self.training)
        normed = self.post_attention_layernorm(hidden)
        mlp = self.mlp(normed)
        return (normed if self.post_ln else hidden) + F.dropout(mlp, self.hidden_dropout,
                                                                self.training)


def _kept_rows_of(x: torch.Tensor, indices: torch.Tensor, config, parallel) -> torch.Tensor:
    """The rows ``indices [b, r]`` of ``x`` [b, s, h]; under sequence parallelism ``x`` is this
    rank's chunk [b, s / tp, h] and so is the result, [b, r / tp, h] (all-gather, gather, split:
    everything between is replicated, so the backwards split the complete gradients)."""
    if config.sequence_parallel and parallel.tp_size > 1:
        full = gather_from_sequence_parallel_region(x, parallel, output_grad_is_partial=False)
        return scatter_to_sequence_parallel_region(gather_tokens(full, indices), parallel)
    return gather_tokens(x, indices)


class ParallelTransformer(nn.Module):
    """The stack of layers this pipeline stage owns, plus the final LayerNorm on the last stage.

    Contract with the layers (what token dropping relies on): the block owns the loop and calls
    each layer as ``layer(hidden [b, r, h], position_ids [b, r] | None, attention_mask | None)``.
    A layer works on any number of tokens r <= s: it uses only the given position ids (rope is
    applied at those positions, never at 0..r-1) and the given mask (causal among the r tokens
    when None, so a subset must be passed in ascending position order). The block may therefore
    gather a subset of tokens with their position ids and mask rows/columns before a layer and
    scatter the outputs back (``_forward_layer`` is that seam). Dropped tokens skip the layer.

    ``layer_ids`` are the global layer indices owned here (default: all); ``layers[i]`` has
    ``layer_number == layer_ids[i]``. Parameter names use the local index, as Megatron's
    per-stage checkpoints do.

    random-LTD (``forward(..., token_drop=TokenDropState)``): only in training mode, each layer
    whose global id maps to a kept length r < s in ``token_drop.kept_lengths`` runs on r tokens
    per sample. The kept positions come from ``megatron.ltd.dropping`` (uniform, independent per
    layer and sample, sorted ascending, a pure function of seed, iteration, global layer id and
    sample id, no torch RNG). The block gathers the kept rows of the hidden states, their
    ORIGINAL position ids, and the rows/columns of an explicit mask ([b,1,r,r]) or the columns
    of a padding mask ([b,1,1,r]) (None stays None: causal among sorted tokens); runs the layer
    (checkpointed on the gathered inputs under full recompute, so the recompute sees the same
    tokens); and scatters the outputs back out of place. Dropped tokens pass unchanged, their
    gradient straight through. Eval mode, ``token_drop=None`` and r >= s run the dense layer, so
    keeping every token is bit-identical to the dense model.

    Query layers (``token_drop.query_layers``, BERT TokenBypass's layer L/2-1): the layer gets
    the whole sequence and the kept positions (``layer(..., query_indices)``); its attention
    takes the kept tokens' query rows over all keys/values, its residual stream and MLP run on
    the kept tokens only, and the block scatters its [b, r, h] output back. Same seam, no
    second copy of the layer.
    """

    _always_gather = False
    """Tests: route layers with r >= s through gather/scatter too (with all positions)."""

    def __init__(self, config: TransformerConfig, parallel: ParallelState = ParallelState(), *,
                 layer_ids: Optional[Sequence[int]] = None, post_process: bool = True,
                 causal: bool = True):
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.layer_ids = list(range(config.num_layers)) if layer_ids is None else list(layer_ids)
        if any(not 0 <= i < config.num_layers for i in self.layer_ids):
            raise ValueError(f"layer ids {self.layer_ids} outside 0..{config.num_layers - 1}")
        layers = []
        for i in self.layer_ids:
            with seeded_init(config.init_seed, 1 + i):  # part id: layer i (embeddings are 0)
                layers.append(ParallelTransformerLayer(config, i, parallel, causal))
        self.layers = nn.ModuleList(layers)
        self.post_process = post_process
        self.causal = causal
        if post_process:
            self.final_layernorm = _layer_norm(config)

    def _forward_layer(self, layer, hidden, position_ids, attention_mask, *extra):
        """``extra``: the query layer's ``query_indices`` (none for an ordinary layer)."""
        recompute = self.config.recompute_granularity == "full"
        if recompute and self.training and torch.is_grad_enabled():
            return _checkpointed(layer, self.parallel.rng_tracker, hidden, position_ids,
                                 attention_mask, *extra)
        return layer(hidden, position_ids, attention_mask, *extra)

    def _forward_query_layer(self, layer, hidden, position_ids, attention_mask, indices):
        """TokenBypass's query layer: the tokens ``indices [b, r]`` of each sample are the
        queries, all tokens the keys/values (with the full position ids and mask); the layer's
        output for the kept tokens is scattered back, the dropped tokens skip it. Under
        sequence parallelism r must be divisible by tp."""
        if self._sequence_parallel and indices.size(1) % self.parallel.tp_size:
            raise UserError(f"TokenBypass with --sequence-parallel: kept length "
                            f"{indices.size(1)} of layer {layer.layer_number} is not divisible "
                            f"by --tensor-model-parallel-size ({self.parallel.tp_size})")
        kept = self._forward_layer(layer, hidden, position_ids, attention_mask, indices)
        if not self._sequence_parallel:
            return scatter_tokens(hidden, indices, kept)
        # hidden is this rank's chunk [b, s/tp, h], kept [b, r/tp, h] (the layer's queries are
        # the kept rows of the all-gathered sequence; its dense projection reduce-scatters them)
        parallel = self.parallel
        kept = gather_from_sequence_parallel_region(kept, parallel,
                                                    output_grad_is_partial=False)  # [b, r, h]
        full = gather_from_sequence_parallel_region(hidden, parallel,
                                                    output_grad_is_partial=False)  # [b, s, h]
        return scatter_to_sequence_parallel_region(scatter_tokens(full, indices, kept),
                                                   parallel)  # [b, s / tp, h]

    def _forward_dropped(self, layer, hidden, position_ids, attention_mask, indices):
        """Run ``layer`` on the tokens ``indices [b, r]`` of each sample; the rest skip it."""
        if self._sequence_parallel:
            return self._forward_dropped_sp(layer, hidden, position_ids, attention_mask, indices)
        s = hidden.size(1)
        flat = flat_token_indices(indices, s)
        kept = gather_tokens(hidden, indices, flat)
        kept_positions = gather_position_ids(position_ids, indices, s)
        kept_mask = gather_attention_mask(attention_mask, indices, s)
        # The kept tokens of a padded batch are a padded batch too (their columns of the
        # padding mask): the layer runs on the real ones among them, packed.
        packing = self._packing(kept, kept_positions, kept_mask)
        if packing is None:
            kept = self._forward_layer(layer, kept, kept_positions, kept_mask)
        else:
            kept = packing.unpack(self._forward_layer(layer, packing.pack(kept), kept_positions,
                                                      kept_mask, None, packing), kept)
        return scatter_tokens(hidden, indices, kept, flat)

    def _forward_dropped_sp(self, layer, hidden, position_ids, attention_mask, indices):
        """random-LTD under sequence parallelism: ``hidden`` is this rank's chunk [b, s/tp, h].

        The kept positions index the full sequence, so the chunks are all-gathered, the kept
        tokens gathered ([b, r, h], identical on every rank) and split into r/tp chunks for the
        sequence-parallel layer; its output chunks are all-gathered, scattered into the full
        sequence, and this rank's chunk is kept. Everything between the collectives is
        replicated, so their backwards split (not reduce-scatter) the complete gradients.
        Needs r divisible by tp (three extra collectives per dropping layer).
        """
        parallel = self.parallel
        r = indices.size(1)
        if r % parallel.tp_size:
            raise UserError(f"random-LTD with --sequence-parallel: kept length {r} of layer "
                            f"{layer.layer_number} is not divisible by "
                            f"--tensor-model-parallel-size ({parallel.tp_size}); use "
                            f"--random-ltd-start/--random-ltd-step multiples of it")
        full = gather_from_sequence_parallel_region(hidden, parallel,
                                                    output_grad_is_partial=False)  # [b, s, h]
        s = full.size(1)
        flat = flat_token_indices(indices, s)
        kept = scatter_to_sequence_parallel_region(gather_tokens(full, indices, flat),
                                                   parallel)  # [b, r / tp, h]
        kept = self._forward_layer(layer, kept, gather_position_ids(position_ids, indices, s),
                                   gather_attention_mask(attention_mask, indices, s))
        kept = gather_from_sequence_parallel_region(kept, parallel,
                                                    output_grad_is_partial=False)  # [b, r, h]
        return scatter_to_sequence_parallel_region(scatter_tokens(full, indices, kept, flat),
                                                   parallel)  # [b, s / tp, h]

    @property
    def _sequence_parallel(self) -> bool:
        return self.config.sequence_parallel and self.parallel.tp_size > 1

    def forward(self, hidden: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                token_drop: Optional[TokenDropState] = None) -> torch.Tensor:
        """hidden [b, s, h] -> [b, s, h] (after the final LayerNorm on the last stage).
        ``token_drop``: random-LTD for this micro-batch (training mode only; see the class).
        Sequence-parallel: hidden is this rank's chunk [b, s / tp, h], and so is the output;
        position_ids and attention_mask describe the full sequence."""
        seq_len = hidden.size(1) * (self.parallel.tp_size if self._sequence_parallel else 1)
        drops = {}
        if token_drop is not None and self.training:
            if token_drop.sample_ids.shape != (hidden.size(0),):
                raise ValueError(f"token_drop.sample_ids has shape "
                                 f"{tuple(token_drop.sample_ids.shape)}, expected "
                                 f"({hidden.size(0)},): one id per sample of the micro-batch")
            drops = kept_indices_by_layer(token_drop, self.layer_ids, seq_len,
                                          hidden.device, include_full=self._always_gather)
        rng = contextlib.nullcontext()
        if self.config.sequence_parallel and self.training and \
                (self.config.hidden_dropout > 0 or self.config.attention_dropout > 0):
            rng = tp_region_rng(self.parallel)  # each rank drops out different tokens
        packing = None  # (when every layer here drops, no layer runs on the whole batch)
        if len(drops) < len(self.layer_ids):
            packing = self._packing(hidden, position_ids, attention_mask)
        padded = None  # the padded batch while hidden holds its packed real tokens
        with rng:
            for layer_id, layer in zip(self.layer_ids, self.layers):
                indices = drops.get(layer_id)
                if indices is None and packing is not None:
                    if padded is None:
                        padded, hidden = hidden, packing.pack(hidden)
                    hidden = self._forward_layer(layer, hidden, position_ids, attention_mask,
                                                 None, packing)
                    continue
                if padded is not None:  # a dropping layer: back to the padded batch
                    padded, hidden = None, packing.unpack(hidden, padded)
                if indices is None:
                    hidden = self._forward_layer(layer, hidden, position_ids, attention_mask)
                elif layer_id in token_drop.query_layers:
                    hidden = self._forward_query_layer(layer, hidden, position_ids,
                                                       attention_mask, indices)
                else:
                    hidden = self._forward_dropped(layer, hidden, position_ids,
                                                   attention_mask, indices)
        if padded is not None:
            hidden = packing.unpack(hidden, padded)
        if self.post_process:
            hidden = self.final_layernorm(hidden)
        return hidden

    def _packing(self, hidden, position_ids, attention_mask) -> Optional[PackedTokens]:
        """The packing of the real tokens (``PackedTokens``) when this block may run layers on
        them: a padding mask with padding, no sequence parallelism (the chunks split the
        sequence), and ``config.pack_padded_tokens``. None otherwise."""
        if not self.config.pack_padded_tokens or self._sequence_parallel \
                or not _is_padding_mask(attention_mask):
            return None
        return PackedTokens.from_padding_mask(attention_mask, hidden.size(0), position_ids)


def _checkpointed(layer, tracker, *args):
    """Run ``layer(*args)`` keeping only its inputs; recompute it in backward.

    torch's checkpoint replays the default generators; the tracker's tensor-parallel state has
    moved on by the time of the recompute, so it is snapshotted here and replayed too (Megatron's
    CheckpointFunction does the same), giving the same attention-dropout masks.
    """
    if tracker is None:
        return checkpoint(layer, *args, use_reentrant=False)
    snapshot = {}

    @contextlib.contextmanager
    def forward_ctx():
        snapshot.update(tracker.get_states())
        yield

    @contextlib.contextmanager
    def recompute_ctx():
        current = tracker.get_states()
        tracker.set_states(snapshot)
        try:
            yield
        finally:
            tracker.set_states(current)

    return checkpoint(layer, *args, use_reentrant=False,
                      context_fn=lambda: (forward_ctx(), recompute_ctx()))


def is_encoder_model(model: nn.Module) -> bool:
    """Whether ``model`` holds a bidirectional (encoder, BERT) transformer block: TokenBypass
    then uses its encoder variant (a query layer, MLM attribution)."""
    return any(isinstance(m, ParallelTransformer) and not m.causal for m in model.modules())
