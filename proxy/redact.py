"""Keep secrets out of logs, errors and reprs: wrap them, and show only a short fingerprint; take them out of
texts that come from outside (``Redactor``)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus


def fingerprint(value: str | bytes) -> str:
    """First 8 hex chars of SHA-256: enough to tell two tokens apart, useless to an attacker."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:8]


class Secret:
    """A string that never shows itself by accident (repr, str, f-strings, tracebacks).

    Call :meth:`reveal` at the one place where the real value must go on the wire.
    """

    __slots__ = ("_fingerprint", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._fingerprint: str | None = None

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        """Worked out once: the access log shows the token's on every line."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._value)
        return self._fingerprint

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


# --------------------------------------------------------------------------- texts from outside

REDACTED = "[redacted]"
#: how much of a text from outside (a token server's ``error_description``, a TLS or connection error, an
#: outbound proxy's reason phrase) is shown, after redaction
OUTSIDE_TEXT_LIMIT = 300
#: a run of this many characters of a secret is redacted wherever it appears: a quote cut short by whoever
#: sent it still shows most of the secret
FRAGMENT_LENGTH = 12
#: values shorter than this are not searched for: too short to be a real secret, and replacing them mangles every line
MIN_SECRET_LENGTH = 4
_SCAN_LIMIT = 4096  # texts are cut to this before redaction: a remote answer may be up to 1 MiB
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _hex_byte(byte: int) -> str:
    """``%2f`` in either case, as a regular expression."""
    digits = f"{byte:02x}"
    return "%" + "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in digits)


def _secret_pattern(secret: str) -> str:
    """The secret as it was received or re-encoded by whoever quotes it: each character literally, percent-
    encoded (either case), ``+`` for a space (form encoding) and ``\\/`` for a slash (JSON)."""
    parts = []
    for char in secret:
        alternatives = [re.escape(char), "".join(_hex_byte(b) for b in char.encode())]
        if char == " ":
            alternatives.append(r"\+")
        elif char == "/":
            alternatives.append(r"\\/")
        parts.append("(?:" + "|".join(alternatives) + ")")
    return "".join(parts)


class Redactor:
    """Takes the configured secrets out of texts that come from outside before they are shown anywhere.

    A token server that quotes what it received (its ``error_description``), a TLS library's reason
    string or an outbound proxy's reason phrase may contain a client secret, a key password or an API key.
    ``redactor(text)`` replaces every secret — as sent, percent- or form-encoded, and any run of at least
    ``FRAGMENT_LENGTH`` characters of it or of its encoded forms (a quote cut short) — with ``[redacted]``,
    turns control characters
    (line breaks: forged log lines) into spaces, and only then cuts the text to ``limit`` characters, so
    that the cut never leaves half a secret behind. Values shorter than ``MIN_SECRET_LENGTH`` are ignored (a
    one-letter "secret" would turn every ``b`` into ``[redacted]``). The secrets are kept as ``Secret`` and the
    object's repr names only how many there are.
    """

    __slots__ = ("_fragments", "_pattern", "_secrets")

    def __init__(self, secrets: Iterable[Secret | str | None] = ()) -> None:
        values: list[str] = []
        for secret in secrets:
            value = secret.reveal() if isinstance(secret, Secret) else secret
            if value and len(value) >= MIN_SECRET_LENGTH and value not in values:
                values.append(value)
        values.sort(key=len, reverse=True)  # the longest first: a secret that contains another one
        self._secrets = tuple(Secret(value) for value in values)
        self._pattern = re.compile("|".join(_secret_pattern(value) for value in values)) if values else None
        fragments: list[str] = []
        for value in values:
            for form in (value, quote(value, safe=""), quote_plus(value)):
                if len(form) > FRAGMENT_LENGTH and form not in fragments:
                    fragments.append(form)
        self._fragments = tuple(fragments)

    def with_secrets(self, secrets: Iterable[Secret | str | None]) -> Redactor:
        """A redactor for these secrets and this one's."""
        return Redactor([*self._secrets, *secrets])

    def __len__(self) -> int:
        return len(self._secrets)

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secrets)"

    def __call__(self, text: str, limit: int = OUTSIDE_TEXT_LIMIT) -> str:
        text = text[:_SCAN_LIMIT]
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
            for secret in self._fragments:
                text = _redact_fragments(text, secret)
        text = _CONTROL.sub(" ", text)
        if len(text) > limit:
            text = text[: max(0, limit - 1)] + "…"
        return text


def _redact_fragments(text: str, secret: str) -> str:
    """Replace every run of ``FRAGMENT_LENGTH`` or more characters of ``secret`` that appears in ``text``."""
    spans: list[tuple[int, int]] = []
    for start in range(len(secret) - FRAGMENT_LENGTH + 1):
        piece = secret[start : start + FRAGMENT_LENGTH]
        found = text.find(piece)
        while found != -1:
            spans.append((found, found + FRAGMENT_LENGTH))
            found = text.find(piece, found + 1)
    if not spans:
        return text
    spans.sort()
    merged = [spans[0]]
    for begin, end in spans[1:]:
        if begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    for begin, end in reversed(merged):
        text = text[:begin] + REDACTED + text[end:]
    return text
