"""The SSH backends under a login shell that is not a Bourne shell (issue 7 item 10).

ssh hands every remote command to the user's login shell; csh and tcsh reject a multi-line
single-quoted script, so every site script must start from one line.  The sshd fixture's
``cax-tcsh`` user is root with /bin/tcsh as its shell; the representative conformance tests
below (put, get, manifest, rename, remove, exists, hostile names) run as that user for every
SSH method.
"""

from __future__ import annotations

import pytest

from cax.transport.base import open_transport
from tests.conformance.test_transport import (  # noqa: F401 - collected here with our fixtures
    SSH_METHODS,
    test_transport_hostile_names_copied_verbatim_without_shell,
    test_transport_manifest_of_missing_path_raises_file_not_found,
    test_transport_remove_and_exists,
    test_transport_rename_moves_and_refuses_existing_target,
    test_transport_single_file_put_get_roundtrip_identical,
    test_transport_tree_put_get_roundtrip_identical,
)
from tests.sshd import SshdUnavailableError, ensure_tcsh_user

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tcsh_user() -> str:
    try:
        return ensure_tcsh_user()
    except SshdUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=SSH_METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def transport(sshd, tcsh_user: str, method: str):
    with open_transport(sshd.endpoint(method, username=tcsh_user), stall_timeout_s=10) as t:
        yield t
