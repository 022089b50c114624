"""Bearer-token authentication and the principal behind each call.

Clients send ``authorization: Bearer <token>`` metadata. Each accepted token
belongs to a *principal*, the owner recorded on the jobs and models it creates.
Tokens come from the settings (env; principal ``default``) and/or a tokens
file (a mounted Secret) whose lines are ``<principal> <token>``, or a bare
``<token>`` for ``default``. Principals named in ``auth.admin_principals`` see
every principal's resources. With no token configured, authentication is off
and every caller is the principal ``anonymous``. Comparison is constant-time.

Health checks are exempt by default (kubelet probes carry no token); whether
reflection needs a token is ``auth.reflection_requires_token``.
"""

from __future__ import annotations

import contextvars
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

from atelier.kit.settings import AuthSettings

#: The principal of every call when authentication is off.
ANONYMOUS = "anonymous"
#: The principal of tokens given without a name (env tokens, bare lines in the file).
DEFAULT_PRINCIPAL = "default"
PRINCIPAL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``admin`` principals see and manage every principal's resources."""

    name: str
    admin: bool = False

    def owns(self, owner: str) -> bool:
        """Whether a resource recorded with ``owner`` is visible to this principal.
        Resources recorded before owners existed (``""``) are visible to all."""
        return self.admin or not owner or owner == self.name

    @property
    def upload_prefix(self) -> str:
        """The object-store prefix under which this principal may reference objects."""
        return f"uploads/{self.name}/"


#: The principal of the RPC being handled (set by the kit's interceptor).
principal_var: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "principal", default=Principal(ANONYMOUS))  # noqa: B039 (frozen, so immutable)


def current_principal() -> Principal:
    return principal_var.get()


class TokenSet:
    """The accepted bearer tokens and their principals. Empty: authentication is off."""

    def __init__(self, tokens: Iterable[tuple[str, str]], admins: Iterable[str] = ()) -> None:
        admins = frozenset(admins)
        self._tokens = tuple((token.encode(), Principal(name, name in admins))
                             for name, token in tokens if token)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> TokenSet:
        tokens = [(DEFAULT_PRINCIPAL, t.get_secret_value().strip()) for t in settings.tokens]
        if settings.tokens_file is not None:
            tokens += parse_tokens_file(settings.tokens_file.read_text())
        return cls(tokens, settings.admin_principals)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def principal_for(self, authorization: str | None) -> Principal | None:
        """The principal whose token ``authorization`` carries; None if none does."""
        if not self.enabled:
            return Principal(ANONYMOUS)
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        candidate = token.strip().encode()
        # Check every token so the time taken does not reveal which one matched.
        found = None
        for accepted, principal in self._tokens:
            if hmac.compare_digest(candidate, accepted) and found is None:
                found = principal
        return found

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``authorization`` metadata value carries an accepted token."""
        return self.enabled and self.principal_for(authorization) is not None


def parse_tokens_file(text: str) -> list[tuple[str, str]]:
    """(principal, token) pairs of a tokens file; ValueError names a bad line."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            pairs.append((DEFAULT_PRINCIPAL, parts[0]))
        elif len(parts) == 2 and PRINCIPAL_RE.match(parts[0]):
            pairs.append((parts[0], parts[1]))
        else:
            raise ValueError(f"tokens file line {number}: expected '<principal> <token>' "
                             "with a principal of [a-z0-9._-]")
    return pairs
