"""Service keys kept in the OS keychain (macOS Keychain, Windows Credential Locker, a Secret Service such as GNOME
Keyring or KWallet) through ``keyring``, so a client secret or private key need not sit in ``~/Downloads``.

``keyring`` maps (service, username) to one string, under our service name ``odata-auth-proxy``:

- ``#index``: a JSON list of the stored names, because keyring cannot enumerate its entries;
- ``NAME``: a header, JSON ``{"format", "parts", "sha256", "kind", "client_id", "token_url", "private_key"}``.
  It holds no secret, so ``keyring list`` reads headers only; it is written last, so a store cut short
  leaves a checksum mismatch, never a silently mixed key;
- ``NAME#1`` … ``NAME#N``: the record (JSON: the service key text exactly as downloaded and, for an External
  Certificate key, the user's PEM private key) cut into chunks of at most 1000 characters.

Why chunks: the Windows Credential Manager caps a credential blob at ``CRED_MAX_CREDENTIAL_BLOB_SIZE`` =
5 × 512 = 2560 bytes, and keyring's ``WinVaultKeyring`` (25.x) writes the value as UTF-16 without splitting
it: 1280 characters at most. Longer values fail with an opaque ``CredWrite … The stub received bad data``
(jaraco/keyring#355); splitting inside keyring is still an open request (jaraco/keyring#540, PR #763 not
merged). A certificate service key is about 3000 characters of JSON. The record is ASCII (``ensure_ascii``),
so a 1000-character chunk is 2000 bytes in UTF-16: under the cap on every backend.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from proxy.credentials import Material
from proxy.servicekey import ServiceKey, parse_service_key_text

if TYPE_CHECKING:  # keyring itself is imported on first use: ``import keyring`` takes ~0.1 s, every CLI start
    from keyring.backend import KeyringBackend

SERVICE = "odata-auth-proxy"
PREFIX = "keyring:"
INDEX = "#index"
CHUNK_CHARS = 1000
FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

_NO_BACKEND_HINT = (
    "on macOS and Windows it is built in; on Linux install and unlock a Secret Service (GNOME Keyring, KWallet "
    "or KeePassXC; headless: gnome-keyring-daemon inside dbus-run-session), or keep the key in a file: "
    "--service-key FILE"
)
_FRIENDLY = {
    "keyring.backends.macOS": "macOS Keychain",
    "keyring.backends.Windows": "Windows Credential Locker",
    "keyring.backends.SecretService": "Secret Service",
    "keyring.backends.libsecret": "Secret Service (libsecret)",
    "keyring.backends.kwallet": "KWallet",
}


class KeychainError(Exception):
    """One line: what is wrong with which keychain entry and how to fix it; never a secret."""


class KeychainUnavailable(KeychainError):
    """No usable keychain backend, or the backend refused access (locked, denied)."""


def keychain_name(value: str) -> str | None:
    """``NAME`` for a ``keyring:NAME`` reference (a ``--service-key`` value), else None (a file path)."""
    return value[len(PREFIX) :].strip() if value.startswith(PREFIX) else None


def check_name(name: str) -> str:
    """A name that is safe as a keychain account on every backend (and leaves ``#`` to the parts and the index)."""
    if not _NAME.match(name):
        example = "keyring:cpi-dev" if not name else f"keyring:{re.sub(r'[^A-Za-z0-9._-]+', '-', name)[:64]}"
        raise KeychainError(
            f'keychain name "{name}": use 1 to 64 letters, digits, ".", "_" or "-", starting with a letter or '
            f"digit (e.g. {example})"
        )
    return name


@dataclass(frozen=True)
class StoredKey:
    """What ``keyring list`` shows of an entry: never a secret."""

    name: str
    kind: str  # ServiceKey.kind: secret | certificate | external-certificate
    client_id: str
    token_url: str
    private_key: bool  # an External Certificate key's own private key is stored with it

    @property
    def kind_label(self) -> str:
        if self.kind == "external-certificate":
            return "certificate (external, key stored)" if self.private_key else "certificate (external, no key)"
        return self.kind


def backend_label(backend: KeyringBackend) -> str:
    """A name people recognise (``macOS Keychain``), else keyring's own display name."""
    backends = getattr(backend, "backends", None)
    if isinstance(backends, list) and backends:  # the chainer: name what it chains
        return " + ".join(backend_label(b) for b in backends)
    return _FRIENDLY.get(type(backend).__module__, str(type(backend).name))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:200]}" if text else exc.__class__.__name__


class Keychain:
    """The service keys in one keyring backend. Each call goes to the backend: nothing is cached here."""

    def __init__(self, backend: KeyringBackend) -> None:
        self.backend = backend
        self.label = backend_label(backend)

    @classmethod
    def open(cls) -> Keychain:
        """The backend keyring picks (``PYTHON_KEYRING_BACKEND`` or ``keyringrc.cfg`` first), checked usable."""
        try:
            import keyring
            from keyring.backends import fail, null

            backend = keyring.get_keyring()
        except Exception as exc:  # a bad PYTHON_KEYRING_BACKEND / keyringrc.cfg raises anything from import to init
            raise KeychainUnavailable(
                f"no usable OS keychain: the configured keyring backend cannot be loaded ({_one_line(exc)}); "
                "check PYTHON_KEYRING_BACKEND or keyringrc.cfg, or keep the key in a file: --service-key FILE"
            ) from None
        if isinstance(backend, fail.Keyring | null.Keyring):
            raise KeychainUnavailable(f"no usable OS keychain: keyring found no backend; {_NO_BACKEND_HINT}")
        return cls(backend)

    # ------------------------------------------------------------------ raw access, every failure one line

    def _failure(self, action: str, exc: Exception) -> KeychainUnavailable:
        from keyring.errors import NoKeyringError

        if isinstance(exc, NoKeyringError):
            return KeychainUnavailable(f"no usable OS keychain: keyring found no backend; {_NO_BACKEND_HINT}")
        return KeychainUnavailable(
            f"the OS keychain ({self.label}) refused to {action} ({_one_line(exc)}): unlock it (log in to the "
            "desktop session, or allow access when asked) and try again, or keep the key in a file: "
            "--service-key FILE"
        )

    # Backends raise their own exceptions (dbus errors, pywintypes.error, OSError) besides KeyringError, and none
    # of them may end in a traceback: each becomes one line naming the exception, never a value passed in.

    def _get(self, entry: str) -> str | None:
        try:
            value = self.backend.get_password(SERVICE, entry)
        except Exception as exc:
            raise self._failure("read an entry", exc) from None
        return value if isinstance(value, str) else None

    def _set(self, entry: str, value: str) -> None:
        try:
            self.backend.set_password(SERVICE, entry, value)
        except Exception as exc:
            raise self._failure("store an entry", exc) from None

    def _delete(self, entry: str) -> None:
        from keyring.errors import PasswordDeleteError

        try:
            self.backend.delete_password(SERVICE, entry)
        except PasswordDeleteError:
            return  # already gone
        except Exception as exc:
            raise self._failure("delete an entry", exc) from None

    # ------------------------------------------------------------------ index and headers

    def names(self) -> list[str]:
        """The stored names, sorted. A damaged index reads as empty rather than blocking every command."""
        raw = self._get(INDEX)
        try:
            data = json.loads(raw) if raw else []
        except ValueError:
            data = []
        if not isinstance(data, list):
            return []
        return sorted({n for n in data if isinstance(n, str) and _NAME.match(n)})

    def _header(self, name: str) -> dict[str, Any] | None:
        raw = self._get(name)
        if raw is None:
            return None
        try:
            header = json.loads(raw)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("parts"), int):
            raise KeychainError(
                f'keychain entry "{name}" is damaged or from another program: store the key again with '
                f"odata-auth-proxy keyring add {name} FILE (or remove it: odata-auth-proxy keyring remove {name})"
            )
        return header

    def unknown(self, name: str) -> KeychainError:
        """The error for a name that is not stored: lists what is, and how to store it."""
        names = self.names()
        stored = f"stored: {', '.join(names)}" if names else "none stored yet"
        return KeychainError(
            f'no service key named "{name}" in the OS keychain ({self.label}; {stored}); store it with: '
            f"odata-auth-proxy keyring add {name} key.json"
        )

    def summaries(self) -> list[StoredKey | str]:
        """One entry per stored name: its summary, or the bare name when its entries are missing or damaged."""
        out: list[StoredKey | str] = []
        for name in self.names():
            try:
                header = self._header(name)
            except KeychainError:
                header = None
            if header is None:
                out.append(name)
                continue
            out.append(
                StoredKey(
                    name=name,
                    kind=str(header.get("kind", "?")),
                    client_id=str(header.get("client_id", "?")),
                    token_url=str(header.get("token_url", "?")),
                    private_key=bool(header.get("private_key")),
                )
            )
        return out

    # ------------------------------------------------------------------ store, load, remove

    def store(self, name: str, key_text: str, key: ServiceKey, private_key_pem: str | None) -> bool:
        """Store a validated key (and an External Certificate key's PEM private key); True if it replaced one."""
        check_name(name)
        record = json.dumps({"service_key": key_text, "private_key": private_key_pem}, ensure_ascii=True)
        chunks = [record[i : i + CHUNK_CHARS] for i in range(0, len(record), CHUNK_CHARS)]
        header = json.dumps(
            {
                "format": FORMAT,
                "parts": len(chunks),
                "sha256": hashlib.sha256(record.encode()).hexdigest(),
                "kind": key.kind,
                "client_id": key.client_id,
                "token_url": key.token_url,
                "private_key": private_key_pem is not None,
            },
            ensure_ascii=True,
        )
        if len(header) > CHUNK_CHARS:
            raise KeychainError(
                f"{key.source}: the client id and token URL are too long to store ({len(header)} characters "
                f"with the header, at most {CHUNK_CHARS}): keep this key in a file"
            )
        try:
            old = self._header(name)
        except KeychainError:
            old = {"parts": 0}  # damaged: overwrite it
        names = self.names()
        if name not in names:  # index first: an entry is never invisible to list/remove, even if cut short
            self._set(INDEX, json.dumps(sorted([*names, name])))
        for number, chunk in enumerate(chunks, 1):
            self._set(f"{name}#{number}", chunk)
        self._set(name, header)
        self._delete_parts(name, first=len(chunks) + 1, known=int(old["parts"]) if old else 0)
        return old is not None

    def load(self, name: str) -> ServiceKey:
        """The stored key, parsed like a file; its private key (if stored) as in-memory PEM, never a file."""
        check_name(name)
        header = self._header(name)
        if header is None:
            raise self.unknown(name)
        parts = [self._get(f"{name}#{number}") for number in range(1, header["parts"] + 1)]
        record = "".join(p for p in parts if p is not None)
        if None in parts or hashlib.sha256(record.encode()).hexdigest() != header.get("sha256"):
            raise KeychainError(
                f'keychain entry "{name}" is incomplete (a store was cut short, or parts were deleted): '
                f"store the key again with odata-auth-proxy keyring add {name} FILE"
            )
        data = json.loads(record)
        key = parse_service_key_text(data["service_key"], f"service key {PREFIX}{name}")
        pem = data.get("private_key")
        if isinstance(pem, str) and key.key is None:
            key = replace(key, key=Material.inline(pem, f"{PREFIX}{name}: private key"))
        return key

    def remove(self, name: str) -> None:
        names = self.names()
        try:
            header = self._header(name)
        except KeychainError:
            header = {"parts": 0}  # damaged: remove it all the same
        if header is None and name not in names:
            raise self.unknown(name)
        self._delete(name)
        self._delete_parts(name, first=1, known=int(header["parts"]) if header else 0)
        if name in names:
            self._set(INDEX, json.dumps([n for n in names if n != name]))

    def _delete_parts(self, name: str, first: int, known: int) -> None:
        """Delete ``NAME#first`` … at least up to ``known``, then on while parts exist (left by a cut-short store)."""
        number = first
        while number <= known or self._get(f"{name}#{number}") is not None:
            self._delete(f"{name}#{number}")
            number += 1


def load_service_key(name: str) -> ServiceKey:
    """``keyring:NAME`` → the stored service key (raises KeychainError, or ServiceKeyError if it no longer parses)."""
    if not name:
        raise KeychainError(f"{PREFIX}: give the stored key's name, e.g. --service-key {PREFIX}cpi-dev")
    return Keychain.open().load(name)
