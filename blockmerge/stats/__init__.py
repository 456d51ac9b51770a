"""Statistics of models over data (Fisher, Gram matrices, trimmed task vectors), written to the store."""

from .compute import compute
from .data import TaskSpec, batches, load_task
from .fisher import Statistics, blockwise_fisher, fisher
from .gram import gram
from .shard import load_model
from .store import StatisticsWriter, write_statistics
from .trimmed import trimmed

__all__ = ["Statistics", "StatisticsWriter", "TaskSpec", "batches", "blockwise_fisher", "compute", "fisher", "gram",
           "load_model", "load_task", "trimmed", "write_statistics"]
