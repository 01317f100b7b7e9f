"""Named RNG states for dropout inside tensor-parallel regions (Megatron's CudaRNGStatesTracker).

Activations outside TP regions are replicated on every TP rank, so their dropout must draw the
same mask on every rank: it uses the default generator, seeded with the same ``seed`` on all TP
ranks. Activations inside a TP region (the attention probabilities of this rank's heads) are
different on every rank and need different masks: they draw from a tracked state seeded with
``seed + 2718 + tp_rank`` (Megatron's offset), swapped into the default generator by ``fork()``.

The tracker covers the CPU default generator and, when CUDA is available, the current device's
default CUDA generator, so the same code is deterministic on both. It is an ordinary object held
by the ``ParallelState`` (``rng_tracker``); checkpoints store ``get_states()``.
"""

import contextlib
from typing import Dict

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
"""Name of the tracked state used for dropout inside tensor-parallel regions."""

_TP_SEED_OFFSET = 2718


def model_parallel_seed(seed: int, tp_rank: int) -> int:
    """Seed of the tensor-parallel-region generator on ``tp_rank`` (Megatron: seed + 2718 + rank).

    The default (data-parallel) generator keeps ``seed`` itself.
    """
    return seed + _TP_SEED_OFFSET + tp_rank


def _get_device_states():
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_device_states(states):
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class RNGStatesTracker:
    """Named generator states that can be swapped into the default generators with ``fork``."""

    def __init__(self):
        self._states: Dict[str, Dict[str, torch.Tensor]] = {}
        self._seeds = set()

    def add(self, name: str, seed: int) -> None:
        """Create the state ``name`` as a generator freshly seeded with ``seed``."""
        if name in self._states:
            raise RuntimeError(f"RNG state {name!r} already exists")
        if seed in self._seeds:
            raise RuntimeError(f"seed {seed} is already used by another RNG state")
        saved = _get_device_states()
        torch.random.default_generator.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed(seed)
        self._states[name] = _get_device_states()
        self._seeds.add(seed)
        _set_device_states(saved)

    def has(self, name: str) -> bool:
        return name in self._states

    def reset(self) -> None:
        """Forget every state."""
        self._states.clear()
        self._seeds.clear()

    def get_states(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Copies of every state, ``{name: {'cpu': ByteTensor, 'cuda': ByteTensor?}}``."""
        return {name: {dev: t.clone() for dev, t in s.items()} for name, s in self._states.items()}

    def set_states(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Replace every state by ``states`` (as returned by ``get_states``)."""
        self._states = {name: {dev: t.clone() for dev, t in s.items()}
                        for name, s in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block with the default generators set to state ``name``; advance that state."""
        if name not in self._states:
            raise RuntimeError(f"RNG state {name!r} was never added to the tracker")
        saved = _get_device_states()
        _set_device_states(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_device_states()
            _set_device_states(saved)


def build_rng_tracker(seed: int, tp_rank: int = 0) -> RNGStatesTracker:
    """A tracker holding the tensor-parallel-region state for ``tp_rank`` (Megatron's
    ``model_parallel_cuda_manual_seed``). Seeding the default generator with ``seed`` is the
    caller's job (``torch.manual_seed(seed)``)."""
    tracker = RNGStatesTracker()
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(seed, tp_rank))
    return tracker


def tp_region_rng(parallel):
    """Context for randomness inside a tensor-parallel region of ``parallel`` (a ParallelState).

    Forks the tracker's model-parallel state when the layout has a tracker; with no tracker and
    tp_size == 1 the default generator is used (nothing differs between ranks).
    """
    tracker = parallel.rng_tracker
    if tracker is not None:
        return tracker.fork(MODEL_PARALLEL_RNG)
    if parallel.tp_size > 1:
        raise RuntimeError("tensor-parallel dropout needs ParallelState.rng_tracker "
                           "(build_rng_tracker(seed, tp_rank))")
    return contextlib.nullcontext()
