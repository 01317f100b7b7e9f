"""The parallel layout of one process: tensor, pipeline and data parallel sizes, ranks and groups.

Built once at start-up (``megatron.initialize``) and passed down explicitly to every layer that
communicates. There are no module-level process-group globals: code that needs a group reads it
from the ``ParallelState`` it was given. The default value describes a single process (every size
1, every group ``None``), which is what unit tests and single-device runs use.
"""

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple


@dataclass(frozen=True)
class ParallelState:
    """Sizes, ranks and process groups of this process in the TP x PP x DP layout."""

    tp_size: int = 1
    """Tensor-model-parallel world size (--tensor-model-parallel-size)."""
    tp_rank: int = 0
    """This process's rank inside its tensor-parallel group."""
    tp_group: Any = None
    """torch.distributed process group of the tensor-parallel ranks (None when tp_size == 1)."""
    pp_size: int = 1
    """Pipeline-model-parallel world size (--pipeline-model-parallel-size)."""
    pp_rank: int = 0
    """This process's pipeline stage."""
    pp_group: Any = None
    """Process group of the pipeline stages that hold one model replica (None when pp_size == 1)."""
    dp_size: int = 1
    """Data-parallel world size (world size / (tp_size * pp_size))."""
    dp_rank: int = 0
    """This process's rank inside its data-parallel group."""
    dp_group: Any = None
    """Process group of the data-parallel replicas (None when dp_size == 1)."""
    pp_ranks: Tuple[int, ...] = (0,)
    """Global ranks of this pipeline's stages, stage order (point-to-point peers)."""
    tp_ranks: Tuple[int, ...] = (0,)
    """Global ranks of this tensor-parallel group (tp_ranks[0] is its source for broadcasts)."""
    dp_ranks: Tuple[int, ...] = (0,)
    """Global ranks of this data-parallel group."""
    embedding_group: Any = None
    """Group of the first and last pipeline stage, which all-reduce the tied embedding's grads
    (None when pp_size == 1)."""
    mp_group: Any = None
    """Group of one model replica (its TP x PP ranks): grad norm and inf/nan checks reduce over
    it (None when tp_size * pp_size == 1)."""
    vp_size: int = 1
    """Model chunks per pipeline stage (--num-layers-per-virtual-pipeline-stage); above 1 only
    in the view a chunk is built with (``pipeline_utils.build_model_chunks``)."""
    vp_rank: int = 0
    """The chunk that view describes: virtual stage ``vp_rank * pp_size + pp_rank``."""
    rng_tracker: Optional[Any] = field(default=None, compare=False, repr=False)
    """RNGStatesTracker used for dropout inside tensor-parallel regions (attention probabilities).
    None: such dropout uses the default generator, which is only correct when tp_size == 1."""

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "vp"):
            size, rank = getattr(self, f"{name}_size"), getattr(self, f"{name}_rank")
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"bad parallel layout: {name}_size={size}, {name}_rank={rank}")

    def process_groups(self) -> Tuple[Any, ...]:
        """This process's groups (tensor, pipeline, data, embedding, model parallel), each
        once, those that exist."""
        groups = []
        for group in (self.tp_group, self.pp_group, self.dp_group, self.embedding_group,
                      self.mp_group):
            if group is not None and all(group is not g for g in groups):
                groups.append(group)
        return tuple(groups)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size

    @property
    def next_stage_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_stage_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def is_first_stage(self) -> bool:
        """True on the pipeline stage (model chunk) that holds the embedding."""
        return self.pp_rank == 0 and self.vp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the pipeline stage (model chunk) that holds the final norm, LM head and
        loss."""
        return self.pp_rank == self.pp_size - 1 and self.vp_rank == self.vp_size - 1
