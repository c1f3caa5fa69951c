"""A missing key file or known_hosts file is named as missing, not as a refused login (real
sshd, every SSH method)."""

from __future__ import annotations

import pytest

from cax.errors import CaxError
from cax.transport.base import Endpoint, open_transport


@pytest.mark.parametrize("method", ["scp", "rsync", "openssh"])
@pytest.mark.parametrize("missing", ["key_file", "known_hosts"])
def test_missing_file_named_as_missing(method, missing, sshd, tmp_path):
    files = {"key_file": sshd.key_file, "known_hosts": sshd.known_hosts,
             missing: str(tmp_path / f"no_{missing}")}
    ep = Endpoint(site="far", method=method, hostname=sshd.host, port=sshd.port,
                  username=sshd.user, **files)
    with pytest.raises(CaxError) as caught:
        with open_transport(ep, stall_timeout_s=30) as transport:
            transport.exists(str(tmp_path))
    message = str(caught.value)
    what = "key_file" if missing == "key_file" else "known_hosts file"
    assert f"{what} {tmp_path / f'no_{missing}'} of site far is missing" in message, message
    assert "authentication" not in message
