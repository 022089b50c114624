"""Bearer-token authentication for gRPC calls.

Clients send ``authorization: Bearer <token>`` metadata. Tokens come from the
settings (env) and/or a file of one token per line. Health is exempt so that
kubelet probes need no token. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from atelier.kit.settings import AuthSettings


class TokenSet:
    """The accepted bearer tokens. Empty means authentication is off."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens if t)

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> TokenSet:
        tokens = [t.get_secret_value().strip() for t in settings.tokens]
        if settings.tokens_file is not None:
            for line in settings.tokens_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    tokens.append(line)
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``authorization`` metadata value carries an accepted token."""
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        candidate = token.strip().encode()
        # Check every token so the time taken does not reveal which one matched.
        matched = False
        for accepted in self._tokens:
            matched |= hmac.compare_digest(candidate, accepted)
        return matched
