"""Fixtures for the batch suites: the real one-node SLURM, and both backends."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.batch.slurm import SlurmCluster, SlurmUnavailableError, available
from tests.conftest import skip_or_fail


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """munged + slurmctld + slurmd for the whole session; clients see it via SLURM_CONF.

    Skipped where it cannot run (failed with CAX_REQUIRE_FIXTURES=1, as in CI).
    """
    reason = available()
    if reason:
        skip_or_fail(f"SLURM fixture: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (SlurmUnavailableError, OSError) as exc:
        skip_or_fail(f"SLURM fixture: {exc}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
