"""random-LTD token dropping: which tokens a layer keeps, and moving them in and out of the layer.

What is sampled from what
    For a dropping layer with kept length ``r`` and an input of ``s`` tokens, sample ``b`` of the
    micro-batch keeps a uniformly random subset of ``r`` of its ``s`` positions, drawn without
    replacement, independently per layer and per sample. The subset is a pure function of
    ``(seed, iteration, global layer id, sample id)`` and ``(s, r)``: each position gets a key
    ``hash(seed, iteration, layer, sample, position)`` and the ``r`` positions with the smallest
    keys are kept. Smallest-keys-of-iid-keys is a uniform ``r``-subset (every ordering of the keys
    is equally likely), so this is the same distribution as DeepSpeed's ``torch.multinomial`` over
    uniform weights.

Why sorted
    The kept positions are returned in ascending order. A layer run on the kept tokens then sees
    them in their original relative order, so GPT's causal mask among the ``r`` tokens (SDPA's
    ``is_causal`` or a gathered explicit mask) still means "attend to earlier tokens only".

Why a hash, not torch's RNG
    - Layout independence: the ``sample id`` is the sample's index in the global batch (the
      training loop passes its dataset index), so every TP/PP/DP layout and every micro-batch
      split draws the same tokens for the same sample; a parallel run matches the single-process
      run, and TP ranks agree without communication and without relying on RNG lockstep.
    - No side effects: torch's generators are never touched, so dropout streams do not shift when
      random-LTD is turned on, the kept length changes, or a layer is recomputed.
    - Exact resume: nothing to checkpoint; the draw for step ``t`` depends only on ``t``.
    - Device/dtype independence: the hash is exact integer arithmetic on int64 tensors whose
      intermediate values never exceed 2**63 (32-bit lanes; 32x32-bit products are split into
      16-bit halves), so CPU and GPU compute the same bits. Keys carry the position in their low
      bits, so they are all distinct and the top-k result never depends on tie-breaking.

Always-kept positions and importance (generalised selection)
    ``keep_mask [b, s]`` (True = always kept, e.g. special tokens for the paper's Tab. 4 ablation)
    gives those positions the smallest keys of all (``-2**63 + position``, below every hash key),
    so they are kept first, in position order if there are more than ``r`` of them, and the other
    ``r - k`` positions are the ``r - k`` smallest hash keys among the rest: still uniform over
    the non-special positions. Without always-kept positions the keys, and so the indices, are
    exactly plain random-LTD's. ``priority [b, s]`` (higher = keep first; TokenBypass importance)
    orders positions by priority, ties by the key above: a stable sort by descending priority of
    the positions in key order. Both stay vectorised, sorted ascending, and pure functions of
    (seed, iteration, layer, sample id) and the given per-position inputs.

Moving tokens
    ``gather_tokens`` is one ``index_select`` on the flattened ``[b*s, h]`` view and
    ``scatter_tokens`` one out-of-place ``index_copy``; see ``scatter_tokens`` for why these
    built-ins are used rather than a custom autograd.Function pair.
"""

from dataclasses import dataclass
from types import MappingProxyType
from typing import Dict, Iterable, Mapping, Optional, Sequence

import torch

__all__ = ["TokenDropState", "sample_kept_indices", "kept_indices_for_layers",
           "kept_indices_by_layer",
           "middle_layer_kept_lengths", "flat_token_indices", "gather_tokens", "scatter_tokens",
           "gather_position_ids", "gather_attention_mask"]

_M32 = 0xFFFFFFFF
# Two independent 32-bit hash lanes (initial state, per-word tweak); digits of pi.
_LANES = ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344))
_FINAL = 0xA4093822


def _mul32(x, c: int):
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` (int or int64 tensor) without 64-bit overflow:
    the constant is split into 16-bit halves so every product stays below 2**49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A 32-bit bijective integer finaliser (xor-shift-multiply, "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(state, word, tweak: int):
    """Fold one 32-bit word into a lane's state."""
    return _mix32(state ^ word ^ tweak)


def _words64(value: int):
    value &= (1 << 64) - 1
    return value & _M32, value >> 32


@dataclass(frozen=True)
class TokenDropState:
    """What the transformer block needs to drop tokens for one micro-batch (passed explicitly).

    ``seed``: the run's seed. ``iteration``: the optimizer step being computed (the same for all
    micro-batches of a step). ``kept_lengths``: global layer id -> kept length r (>= 1); layers
    not in the map run on all tokens, as does any layer whose r >= the input length. The random-LTD
    schedule keeps the first and last layers out of the map (``middle_layer_kept_lengths``).
    ``sample_ids``: [b] integers, a unique id of each sample of the micro-batch within the global
    batch, the same whatever the TP/PP/DP layout or micro-batch split (the dataset index).

    Optional, per position of the full-length input (see the module docstring):
    ``keep_mask``: [b, s] bool, True where the position is always kept (special tokens).
    ``priority``: [b, s] float, higher is kept first, ties broken by the hash (TokenBypass).
    ``shared_layers``: one kept set for all dropping layers with the same kept length (the hash
    of the smallest layer id in ``kept_lengths`` breaks ties), instead of one per layer. The
    dropped tokens then skip the whole range (TokenBypass); the block still gathers and scatters
    around each layer, which gives exactly the values of gathering once and merging back once.
    ``query_layers``: dropping layers (ids in ``kept_lengths``) that run their kept tokens as
    queries over ALL tokens as keys/values (BERT TokenBypass's layer L/2-1); the block gives the
    layer the full sequence and the kept positions, and scatters its output for the kept tokens
    back (the dropped ones skip it, as in any dropping layer).
    """

    seed: int
    iteration: int
    kept_lengths: Mapping[int, int]
    sample_ids: torch.Tensor
    keep_mask: Optional[torch.Tensor] = None
    priority: Optional[torch.Tensor] = None
    shared_layers: bool = False
    query_layers: frozenset = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "query_layers", frozenset(int(i) for i in self.query_layers))
        lengths = {int(k): int(v) for k, v in dict(self.kept_lengths).items()}
        bad = {k: v for k, v in lengths.items() if v < 1 or k < 0}
        if bad:
            raise ValueError(f"kept lengths must be >= 1 for layer ids >= 0, got {bad}")
        object.__setattr__(self, "kept_lengths", MappingProxyType(lengths))
        ids = self.sample_ids
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            raise ValueError(f"sample_ids must be a 1-D integer tensor, got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        object.__setattr__(self, "sample_ids", ids.to(torch.int64))
        for name in ("keep_mask", "priority"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 2 or value.size(0) != ids.numel()):
                raise ValueError(f"{name} must be [b={ids.numel()}, s], got "
                                 f"{tuple(value.shape)}")
        if self.keep_mask is not None and self.keep_mask.dtype != torch.bool:
            raise ValueError(f"keep_mask must be bool, got {self.keep_mask.dtype}")
        if self.priority is not None and not self.priority.dtype.is_floating_point:
            raise ValueError(f"priority must be floating point, got {self.priority.dtype}")


def middle_layer_kept_lengths(num_layers: int, kept: int) -> Dict[int, int]:
    """``{1: kept, ..., num_layers - 2: kept}``: random-LTD's default (first, last layer full)."""
    return {i: kept for i in range(1, num_layers - 1)}


def kept_indices_for_layers(seed: int, iteration: int, layer_ids: Sequence[int],
                            sample_ids: torch.Tensor, seq_len: int, kept: int,
                            keep_mask: Optional[torch.Tensor] = None,
                            priority: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kept positions ``[len(layer_ids), b, kept]`` (int64, each row sorted ascending) for several
    layers at once; row ``[j, i]`` equals ``sample_kept_indices(seed, iteration, layer_ids[j],
    sample_ids[i:i+1], seq_len, kept)[0]``. Vectorised over layers, samples and positions.

    ``keep_mask`` [b, seq_len] bool: positions kept before all others (the first ``kept`` of them
    by position if there are more). ``priority`` [b, seq_len] float: positions kept in order of
    descending priority, ties by the hash (always-kept positions count as +inf). Both are the
    same for every layer of ``layer_ids``."""
    if not 1 <= seq_len < 2 ** 31:
        raise ValueError(f"seq_len must be in [1, 2**31), got {seq_len}")
    if not 1 <= kept <= seq_len:
        raise ValueError(f"kept length must be in [1, seq_len={seq_len}], got {kept}")
    sample_ids = torch.as_tensor(sample_ids)
    if sample_ids.dim() != 1:
        raise ValueError(f"sample_ids must be 1-D [b], got shape {tuple(sample_ids.shape)}")
    device = sample_ids.device
    sid = sample_ids.to(torch.int64)
    sid_lo, sid_hi = sid & _M32, (sid >> 32) & _M32  # [b] each
    pos = torch.arange(seq_len, dtype=torch.int64, device=device)  # [s]
    lanes = []
    for init, tweak in _LANES:
        prefix = init
        for word in (*_words64(seed), *_words64(iteration)):
            prefix = _absorb(prefix, word, tweak)
        per_layer = []
        for layer_id in layer_ids:
            state = prefix
            for word in _words64(int(layer_id)):
                state = _absorb(state, word, tweak)
            per_layer.append(state)
        state = torch.tensor(per_layer, dtype=torch.int64, device=device).view(-1, 1)  # [L, 1]
        state = _absorb(_absorb(state, sid_lo, tweak), sid_hi, tweak)  # [L, b]
        state = _mix32(state ^ _FINAL)
        # One mix per (layer, sample, position): the row state xor a per-position hash.
        lanes.append(_mix32(state.unsqueeze(-1) ^ _absorb(pos, init, tweak)))  # [L, b, s]
    pos_bits = max(1, (seq_len - 1).bit_length())
    extra = 31 - pos_bits  # hash bits beyond the first lane's 32: key < 2**63
    hashed = (lanes[0] << extra) | (lanes[1] >> (32 - extra))  # [L, b, s], < 2**(63 - pos_bits)
    keys = (hashed << pos_bits) | pos  # distinct within a row, in [0, 2**63)
    for name, value in (("keep_mask", keep_mask), ("priority", priority)):
        if value is not None and tuple(value.shape) != (sid.numel(), seq_len):
            raise ValueError(f"{name} must be [b={sid.numel()}, seq_len={seq_len}], got "
                             f"{tuple(value.shape)}")
    if keep_mask is not None:
        # Below every hash key, in position order; the low bits still hold the position.
        keys = torch.where(keep_mask.to(device), pos + torch.iinfo(torch.int64).min, keys)
    if priority is None:
        smallest = torch.topk(keys, kept, dim=-1, largest=False, sorted=False).values
        return torch.sort(smallest & ((1 << pos_bits) - 1), dim=-1).values  # [L, b, r]
    priority = priority.to(device)
    if keep_mask is not None:
        priority = priority.masked_fill(keep_mask.to(device), float("inf"))
    by_key = torch.argsort(keys, dim=-1)  # [L, b, s] positions in key order
    ranked = priority.expand_as(keys).gather(-1, by_key)
    # Stable: among equal priorities the key order stays (ties broken by the hash).
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :kept]
    return torch.sort(by_key.gather(-1, order), dim=-1).values  # [L, b, r]


def sample_kept_indices(seed: int, iteration: int, layer_id: int, sample_ids: torch.Tensor,
                        seq_len: int, kept: int, keep_mask: Optional[torch.Tensor] = None,
                        priority: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Positions ``[b, kept]`` (int64, ascending, on ``sample_ids``' device) kept by layer
    ``layer_id`` for each sample: a uniform ``kept``-subset of ``range(seq_len)``, a pure function
    of (seed, iteration, layer_id, sample id) and (seq_len, kept). Never uses torch's RNG.
    ``keep_mask`` / ``priority``: see ``kept_indices_for_layers``."""
    return kept_indices_for_layers(seed, iteration, [layer_id], sample_ids, seq_len, kept,
                                   keep_mask, priority)[0]


def kept_indices_by_layer(state: TokenDropState, layer_ids: Iterable[int], seq_len: int,
                          device: Optional[torch.device] = None,
                          include_full: bool = False) -> Dict[int, torch.Tensor]:
    """Global layer id -> kept positions [b, r] for those of ``layer_ids`` that drop at this
    input length (r < seq_len). ``include_full`` also returns ``arange(seq_len)`` rows for
    layers with r >= seq_len (tests force the gather/scatter path this way). One hash evaluation
    per distinct kept length. With ``state.shared_layers`` the layers of one kept length share
    one selection, and the same tensor object (hashed with the smallest layer id of
    ``state.kept_lengths``, so every pipeline stage agrees)."""
    groups: Dict[int, list] = {}
    for layer_id in layer_ids:
        kept = state.kept_lengths.get(layer_id)
        if kept is None or (kept >= seq_len and not include_full):
            continue
        groups.setdefault(min(kept, seq_len), []).append(layer_id)
    sample_ids = state.sample_ids if device is None else state.sample_ids.to(device)
    out = {}
    for kept, ids in groups.items():
        hashed = [min(state.kept_lengths)] if state.shared_layers else ids
        indices = kept_indices_for_layers(state.seed, state.iteration, hashed, sample_ids,
                                          seq_len, kept, state.keep_mask, state.priority)
        if state.shared_layers:
            out.update((layer_id, indices[0]) for layer_id in ids)
        else:
            out.update(zip(ids, indices.unbind(0)))
    return out


def flat_token_indices(indices: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[b, r] positions -> [b*r] row numbers of the flattened [b*s, h] view."""
    b = indices.size(0)
    offsets = torch.arange(b, dtype=indices.dtype, device=indices.device).mul_(seq_len)
    return (indices + offsets.unsqueeze(1)).reshape(-1)


def gather_tokens(hidden: torch.Tensor, indices: torch.Tensor,
                  flat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hidden [b, s, h], indices [b, r] -> hidden[i, indices[i]] as [b, r, h].

    One index_select; its backward scatters the gradient into zeros at the kept rows. It saves
    only the indices, so nothing of the dropped tokens is kept for backward."""
    b, s, h = hidden.shape
    if flat is None:
        flat = flat_token_indices(indices, s)
    return hidden.reshape(b * s, h).index_select(0, flat).view(b, indices.size(1), h)


def scatter_tokens(hidden: torch.Tensor, indices: torch.Tensor, part: torch.Tensor,
                   flat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of ``hidden [b, s, h]`` whose rows ``indices [b, r]`` are replaced by ``part
    [b, r, h]`` (out of place; ``hidden`` is not modified).

    Gradients: the dropped rows of ``hidden`` receive the output gradient unchanged (straight
    through), its kept rows zero, and ``part`` the output gradient at the kept rows; with
    ``gather_tokens``' backward adding the layer's input gradient at the kept rows, the total is
    exact. Why torch's out-of-place ``index_copy`` and not a custom autograd.Function pair like
    DeepSpeed's GatherTokens/ScatterTokens: it saves only the indices, never modifies a tensor
    another op may have saved (the in-place variant would break autograd when the block's input is
    needed elsewhere, e.g. by a checkpointed layer or the pipeline), supports double backward and
    every dtype/device, and the sums it leaves to autograd add exact zeros, so keeping every token
    is bit-identical to the dense model. The price, one extra [b, s, h] pass in backward, is small
    next to the layer.
    """
    b, s, h = hidden.shape
    if flat is None:
        flat = flat_token_indices(indices, s)
    if part.dtype != hidden.dtype:  # the dense model would carry on in the layer's output dtype
        hidden = hidden.to(part.dtype)
    return hidden.reshape(b * s, h).index_copy(0, flat, part.reshape(-1, h)).view(b, s, h)


def gather_position_ids(position_ids: Optional[torch.Tensor], indices: torch.Tensor,
                        seq_len: int) -> torch.Tensor:
    """The kept tokens' ORIGINAL position ids [b, r] (rope rotates them at these positions);
    ``position_ids`` [b|1, s] or None (meaning 0..s-1)."""
    if position_ids is None:
        return indices
    b = indices.size(0)
    return position_ids.expand(b, seq_len).gather(1, indices)


def gather_attention_mask(mask: Optional[torch.Tensor], indices: torch.Tensor,
                          seq_len: int) -> Optional[torch.Tensor]:
    """The mask among the kept tokens of each sample.

    ``mask`` is broadcastable to [b, 1, s, s] (True = masked out): an explicit [b|1, 1, s, s]
    mask gives rows and columns of the kept tokens, [b, 1, r, r]; a padding mask [b|1, 1, 1, s]
    gives [b, 1, 1, r]; None stays None (the layer's causal path is valid on sorted indices).
    """
    if mask is None:
        return None
    if mask.dim() != 4:
        raise ValueError(f"attention mask must be 4-D [b, 1, s|1, s|1], got {tuple(mask.shape)}")
    b, r = indices.shape
    mask = mask.expand(b, *mask.shape[1:])
    heads, rows, cols = mask.shape[1:]
    if rows == seq_len:
        mask = mask.gather(2, indices.view(b, 1, r, 1).expand(b, heads, r, cols))
        rows = r
    if cols == seq_len:
        mask = mask.gather(3, indices.view(b, 1, 1, r).expand(b, heads, rows, r))
    return mask

