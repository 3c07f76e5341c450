"""Keep secrets out of logs, errors and reprs: wrap them, and show only a short fingerprint."""

from __future__ import annotations

import hashlib


def fingerprint(value: str | bytes) -> str:
    """First 8 hex chars of SHA-256: enough to tell two tokens apart, useless to an attacker."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:8]


class Secret:
    """A string that never shows itself by accident (repr, str, f-strings, tracebacks).

    Call :meth:`reveal` at the one place where the real value must go on the wire.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret(sha256:{self.fingerprint})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)
