"""A connection cut during login or mid-copy is transient for the paramiko method (issue 7 #14).

paramiko reports a connection that dies during authentication as AuthenticationException,
which cax used to record as a permanent authentication failure; the scp package's "No
response from server" escaped as a raw SCPException (a traceback in the daemon's log).  A
proxy in front of the real sshd cuts the connection after a given number of bytes from the
client, at every phase of the login; only a refused key is permanent.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest

from cax.errors import TransferError
from cax.transport.base import open_transport

pytestmark = pytest.mark.timeout(120)


class CuttingProxy:
    """Forward 127.0.0.1:port to the sshd; close both sides after ``cut_after`` client bytes."""

    def __init__(self, target_port: int, cut_after: int):
        self.target_port, self.cut_after = target_port, cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.target_port))
        sent = [0]

        def pump(src: socket.socket, dst: socket.socket, count: bool) -> None:
            try:
                while data := src.recv(65536 if not count else 1):
                    dst.sendall(data)
                    if count:
                        sent[0] += len(data)
                        if sent[0] >= self.cut_after:
                            break
            except OSError:
                pass
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(server, client, False), daemon=True).start()
        pump(client, server, True)

    def close(self) -> None:
        self.listener.close()


def test_scp_connection_cut_at_any_point_of_login_is_retryable(sshd, tmp_path: Path, capfd):
    outcomes = []
    for cut_after in range(100, 4000, 150):
        proxy = CuttingProxy(sshd.port, cut_after)
        known = tmp_path / f"known_{cut_after}"
        known.write_text(Path(sshd.known_hosts).read_text().replace(str(sshd.port),
                                                                    str(proxy.port)))
        ep = sshd.endpoint("scp", port=proxy.port, known_hosts=str(known), connect_timeout_s=5)
        try:
            with open_transport(ep) as t:
                t.exists(str(tmp_path))
            outcomes.append((cut_after, "ok"))
        except TransferError as exc:
            outcomes.append((cut_after, exc.retryable))
            assert exc.retryable, f"cut after {cut_after} bytes: {exc}"
            assert "authentication" not in str(exc), str(exc)
        finally:
            proxy.close()
    assert any(o is True for _, o in outcomes), outcomes  # some cuts did hit the login
    assert "Traceback" not in capfd.readouterr().err


def test_scp_no_response_from_server_is_a_retryable_transfer_error(sshd):
    """What the scp package raises when the site's scp goes away mid-copy."""
    from scp import SCPException

    from cax.transport import ssh

    err = ssh.paramiko_error(sshd.endpoint("scp"), "put", "/x",
                             SCPException("No response from server"))
    assert isinstance(err, TransferError) and err.retryable
    assert "No response from server" in str(err) and "testsite" in str(err)


def test_scp_refused_key_stays_permanent(sshd, tmp_path: Path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    with open_transport(sshd.endpoint("scp", key_file=str(stranger))) as t:
        with pytest.raises(TransferError) as err:
            t.exists(str(tmp_path))
    assert not err.value.retryable and "authentication" in str(err.value)
