"""Fixtures for the interface conformance suites: a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.sshd import Sshd, SshdUnavailableError

REQUIRE_FIXTURES = os.environ.get("CAX_REQUIRE_FIXTURES") == "1"


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A loopback sshd for the whole session (skipped, or failed in CI, where it cannot run).

    Tests that stop it (``sshd.stop()``) must ``sshd.start()`` it again before they end.
    """
    try:
        server = Sshd(tmp_path_factory.mktemp("sshd"))
        server.start()
    except (SshdUnavailableError, FileNotFoundError, OSError) as exc:
        if REQUIRE_FIXTURES:
            pytest.fail(f"required fixture missing: sshd: {exc}")
        pytest.skip(f"sshd fixture unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()  # the log stays next to the keys for post-mortems
