"""Batch queues for processing: one small interface (``base``), two backends.

``local`` runs jobs as a bounded pool of subprocesses on this machine; ``slurm`` submits them
to a SLURM cluster.  Both run the processor under the same wrapper (``supervise``), which
records how each job ended beside its output.
"""

from cax.batch.base import (
    BatchBackend,
    JobSpec,
    JobState,
    JobStatus,
    Resources,
    output_tail,
    recorded_status,
    status_path,
)
from cax.batch.local import LocalBackend
from cax.batch.slurm import SlurmBackend

BACKENDS = ("local", "slurm")

__all__ = [
    "BACKENDS", "BatchBackend", "JobSpec", "JobState", "JobStatus", "LocalBackend", "Resources",
    "SlurmBackend", "output_tail", "recorded_status", "status_path",
]
