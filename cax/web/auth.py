"""Who may read ``cax web``: anyone on this machine by default, only a holder of a secret when
the website listens on a network.

The runs DB tells where every dataset of the experiment lies and which daemons run where: not
for the internet.  Bound to a loopback address (the default, 127.0.0.1) the site is reached
only from this machine -- an SSH tunnel brings it to a laptop.  Bound to any other address it
refuses to start unless the environment holds a secret, and then every request must carry it:

* ``CAX_WEB_TOKEN``: ``Authorization: Bearer <token>`` (for scripts), or the token as the
  password of HTTP basic auth with any user name (for a browser's login prompt);
* ``CAX_WEB_USER`` and ``CAX_WEB_PASSWORD``: HTTP basic auth with exactly these.

Secrets come from the environment, never from the command line (``ps`` shows that to every
user) and never from a query string (it would end up in logs, histories and links).  They are
compared in constant time.  Basic auth sends the secret in clear: off loopback, put the website
behind TLS (a reverse proxy) or reach it through an SSH tunnel.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from cax.errors import ConfigError

TOKEN_VARIABLE, USER_VARIABLE, PASSWORD_VARIABLE = "CAX_WEB_TOKEN", "CAX_WEB_USER", \
    "CAX_WEB_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    """The secrets a request must carry (none: every request is let in)."""

    token: str | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Credentials:
        """Read the secrets from the environment; a user without a password is refused."""
        token = env.get(TOKEN_VARIABLE) or None
        user, password = env.get(USER_VARIABLE) or None, env.get(PASSWORD_VARIABLE) or None
        if (user is None) != (password is None):
            raise ConfigError(f"set both {USER_VARIABLE} and {PASSWORD_VARIABLE}, or neither")
        return cls(token, user, password)

    @property
    def required(self) -> bool:
        return self.token is not None or self.user is not None

    def describe(self) -> str:
        """What a client must send, for the start-up message (never the secret itself)."""
        ways = []
        if self.token is not None:
            ways.append(f"the token in ${TOKEN_VARIABLE} (Authorization: Bearer, or as the "
                        "basic-auth password)")
        if self.user is not None:
            ways.append(f"basic auth as ${USER_VARIABLE} with ${PASSWORD_VARIABLE}")
        return "every request needs " + " or ".join(ways) if ways else \
            "no authentication (loopback only: reachable from this machine alone)"

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the secrets."""
        if not self.required:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer":
            return self.token is not None and _same(value, self.token)
        if scheme != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        # Both checks always run: the time taken tells nothing about which secret was close.
        by_token = self.token is not None and _same(password, self.token)
        by_user = self.user is not None and self.password is not None \
            and _same(user, self.user) & _same(password, self.password)
        return by_token or by_user


def _same(given: str, secret: str) -> bool:
    return hmac.compare_digest(given.encode(), secret.encode())


def is_loopback(bind: str) -> bool:
    """Whether ``bind`` is a loopback address (``localhost`` counts; any other name does not:
    it may resolve to a network address)."""
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_host(host: str) -> bool:
    """Whether a request's ``Host`` names this machine by a loopback name, on any port (an SSH
    tunnel may forward another).  A website on loopback answers nothing else: a page of another
    site, whose name an attacker made resolve to 127.0.0.1 (DNS rebinding), must not read it
    from a browser on this machine."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.split(":")[0]
    return bool(name) and is_loopback(name)


def check_bind(bind: str, credentials: Credentials) -> None:
    """Refuse to listen on a network without a secret (ConfigError, exit 2)."""
    if not is_loopback(bind) and not credentials.required:
        raise ConfigError(
            f"--bind {bind}: not a loopback address, so the website would be open to the "
            f"network; set {TOKEN_VARIABLE}, or {USER_VARIABLE} and {PASSWORD_VARIABLE}, in "
            "the environment (or keep the default --bind 127.0.0.1 and use an SSH tunnel)")
