"""Client certificates for mutual TLS at the token server: parse, check, and load them safely.

Users bring certificates and keys in every shape: PEM values copied out of SAP service keys (with
literal ``\\n`` or with the line breaks lost), separate key files in PKCS#1/PKCS#8/SEC1, encrypted
keys, PKCS#12 bundles. This module turns all of them into one checked :class:`ClientIdentity`, and
fails early with a one-line message that names where the material came from and how to fix it
(wrong password, key that does not match, expired certificate), instead of an opaque TLS handshake
error at the first token request. The stdlib ``ssl`` module can only load a certificate chain from
a file, so :meth:`ClientIdentity.apply_to` hands it over without ever writing a plaintext key to disk.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import secrets
import shutil
import ssl
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from proxy.credentials import CertificateSpec, Material
from proxy.redact import Secret

__all__ = [
    "CertificateError",
    "ClientIdentity",
    "ClientKey",
    "key_file_permission_warning",
    "load_client_identity",
    "normalize_pem",
]

ClientKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
_CLIENT_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)

_KEY_PASSWORD_HINT = "set key_password, key_password_file or ODATA_AUTH_PROXY_KEY_PASSWORD"
_NO_KEY_HINT = "give the key file with --key FILE or credentials.key"
_RENEW_HINT = "create a new service key / renew it"

# A PEM block: the label is upper case words; the body is everything up to the matching END line.
_BEGIN_RE = re.compile(r"-----BEGIN ([A-Z0-9][A-Z0-9 ]*?)-----")
_BLOCK_RE = re.compile(r"-----BEGIN ([A-Z0-9][A-Z0-9 ]*?)-----(.*?)-----END \1-----", re.DOTALL)
# RFC 1421 headers of legacy encrypted keys ("Proc-Type: 4,ENCRYPTED", "DEK-Info: AES-256-CBC,<iv>").
_HEADER_RE = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*):[ \t]*(\S+)")
# Escapes left from JSON values pasted as text: \n, \r\n, \r (also doubly escaped), and \/.
_LITERAL_BREAK_RE = re.compile(r"(?:\\+r)?\\+n|\\+r")
_ESCAPED_SLASH_RE = re.compile(r"\\+/")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class CertificateError(ValueError):
    """A certificate or key that cannot be used: one line naming the origin and the fix, never key material."""


# --------------------------------------------------------------------------------------------- PEM text


@dataclass(frozen=True)
class _PemBlock:
    label: str
    headers: tuple[tuple[str, str], ...]
    der: bytes

    def pem(self) -> bytes:
        b64 = base64.b64encode(self.der).decode("ascii")
        lines = [f"-----BEGIN {self.label}-----"]
        if self.headers:
            lines += [f"{name}: {value}" for name, value in self.headers]
            lines.append("")
        lines += [b64[i : i + 64] for i in range(0, len(b64), 64)]
        lines.append(f"-----END {self.label}-----")
        return ("\n".join(lines) + "\n").encode("ascii")

    @property
    def is_private_key(self) -> bool:
        return self.label.endswith("PRIVATE KEY")

    @property
    def is_encrypted(self) -> bool:
        return self.label == "ENCRYPTED PRIVATE KEY" or any(
            name.lower() == "proc-type" and "ENCRYPTED" in value.upper() for name, value in self.headers
        )


def _as_text(raw: str | bytes) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = text.lstrip("\ufeff")
    text = _LITERAL_BREAK_RE.sub("\n", text)
    return _ESCAPED_SLASH_RE.sub("/", text)


def _parse_pem(raw: str | bytes, origin: str) -> list[_PemBlock]:
    """Every PEM block in ``raw``, whatever happened to its line breaks."""
    text = _as_text(raw)
    blocks: list[_PemBlock] = []
    for match in _BLOCK_RE.finditer(text):
        label, body = match.group(1).strip(), match.group(2)
        headers: list[tuple[str, str]] = []
        while (header := _HEADER_RE.match(body)) is not None:
            headers.append((header.group(1), header.group(2)))
            body = body[header.end() :]
        b64 = "".join(body.split())
        if not _BASE64_RE.fullmatch(b64):
            raise CertificateError(
                f"{origin}: the {label} PEM block contains characters that are not base64: "
                "paste it again exactly as issued"
            )
        try:
            der = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except binascii.Error:
            raise CertificateError(
                f"{origin}: the {label} PEM block is damaged (bad base64): paste it again exactly as issued"
            ) from None
        blocks.append(_PemBlock(label, tuple(headers), der))
    begun = len(_BEGIN_RE.findall(text))
    if begun > len(blocks):
        raise CertificateError(
            f"{origin}: a PEM block has a BEGIN line without its matching END line (truncated copy?): "
            "paste the complete text from -----BEGIN to -----END"
        )
    return blocks


def normalize_pem(raw: str | bytes, *, origin: str = "PEM text") -> bytes:
    """Canonical PEM bytes (64-char lines, ``\\n`` line ends) from any spelling users paste.

    Accepts real line breaks, literal two-character ``\\n`` sequences (JSON values), ``\\r\\n``, base64
    whose line breaks were lost (even the whole block on one line with spaces), surrounding whitespace
    and several concatenated blocks. Raises :class:`CertificateError` when there is no PEM block.
    """
    blocks = _parse_pem(raw, origin)
    if not blocks:
        raise CertificateError(f"{origin}: no PEM block found (expected text starting with -----BEGIN ...)")
    return b"".join(block.pem() for block in blocks)


# ------------------------------------------------------------------------------------------ the identity


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _date(moment: datetime) -> str:
    return moment.date().isoformat()


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _fingerprint(cert: x509.Certificate) -> str:
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


@dataclass(frozen=True)
class ClientIdentity:
    """A checked client certificate chain (leaf first) and its private key, ready for an SSLContext."""

    chain: tuple[x509.Certificate, ...]
    cert_origin: str
    key_origin: str
    private_key: ClientKey = field(repr=False, compare=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def subject(self) -> str:
        """Leaf subject as an RFC 4514 string."""
        return self.leaf.subject.rfc4514_string()

    @property
    def issuer(self) -> str:
        """Leaf issuer as an RFC 4514 string."""
        return self.leaf.issuer.rfc4514_string()

    @property
    def fingerprint_sha256(self) -> str:
        """SHA-256 of the leaf, upper-case hex with colons."""
        return _fingerprint(self.leaf)

    @property
    def not_after(self) -> datetime:
        """Leaf notAfter, timezone-aware UTC."""
        return self.leaf.not_valid_after_utc

    @property
    def not_after_timestamp(self) -> float:
        """Leaf notAfter as a Unix timestamp (for a metrics gauge)."""
        return self.not_after.timestamp()

    def chain_summary(self) -> list[str]:
        """One line per certificate: subject, issuer, notAfter date."""
        return [
            f"subject={c.subject.rfc4514_string()}, issuer={c.issuer.rfc4514_string()}, "
            f"notAfter={_date(c.not_valid_after_utc)}"
            for c in self.chain
        ]

    def chain_warning(self) -> str | None:
        """Why SAP's load balancer may drop this certificate (incomplete chain), or None."""
        why = (
            "SAP's load balancer passes a client certificate on only when the chain sent with it contains "
            "a root it supports, so it may drop it"
        )
        fix = f"append the issuing CA certificates, up to and including the root, after the leaf in {self.cert_origin}"
        if len(self.chain) == 1:
            if _is_self_signed(self.leaf):
                return (
                    f"client certificate {self.subject} ({self.cert_origin}) is self-signed: {why}; "
                    "use a certificate issued by a CA that SAP supports"
                )
            return f"client certificate {self.subject} ({self.cert_origin}) is sent alone: {why}; {fix}"
        for cert, nxt in zip(self.chain, self.chain[1:], strict=False):
            if cert.issuer != nxt.subject:
                return (
                    f"the certificate chain from {self.cert_origin} is broken: the issuer of "
                    f"{cert.subject.rfc4514_string()} ({cert.issuer.rfc4514_string()}) is not in it; "
                    f"{why}; {fix}"
                )
        last = self.chain[-1]
        if not _is_self_signed(last):
            return (
                f"the certificate chain from {self.cert_origin} ends at {last.subject.rfc4514_string()}, "
                f"below its root {last.issuer.rfc4514_string()}: {why}; {fix}"
            )
        return None

    def expiry_warning(self, now: datetime | None = None, days: int = 30) -> str | None:
        """A renewal reminder when the leaf expires within ``days`` days, else None."""
        now = now or datetime.now(UTC)
        left = self.not_after - now
        if left > timedelta(days=days):
            return None
        who = f"client certificate {self.subject} ({self.cert_origin})"
        if left <= timedelta(0):
            return f"{who} expired on {_date(self.not_after)}: {_RENEW_HINT}"
        when = {0: "in less than a day", 1: "in 1 day"}.get(left.days, f"in {left.days} days")
        return f"{who} expires {when} on {_date(self.not_after)}: renew it ({_RENEW_HINT}) before then"

    def apply_to(self, ctx: ssl.SSLContext) -> None:
        """Load the chain (leaf first) and the key into ``ctx`` for use as a TLS client.

        ``SSLContext.load_cert_chain`` only reads files, and a plaintext key must never touch the disk.
        So the chain and the key, re-encrypted with a fresh random password, are written to an anonymous
        in-memory file (Linux ``memfd_create``), loaded via ``/proc/self/fd/N`` and closed. Where that is
        unavailable, the same encrypted form goes to a 0600 file in a private 0700 directory from
        ``tempfile.mkdtemp()``, removed right after loading.
        """
        password = secrets.token_urlsafe(32)
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password.encode()),
        )
        data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain) + key_pem
        try:
            with _pem_file(data) as path:
                ctx.load_cert_chain(path, password=password)
        except ssl.SSLError as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            raise CertificateError(
                f"OpenSSL refused client certificate {self.subject} ({self.cert_origin}): {reason}; "
                "use a certificate with a stronger key or signature"
            ) from None


@contextlib.contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """A path holding ``data`` for as long as the block runs: memfd if possible, else a private temp file."""
    fd = _memfd(data)
    if fd is not None:
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="odata-auth-proxy-")  # mode 0700
    try:
        path = os.path.join(directory, "client.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _memfd(data: bytes) -> int | None:
    create = getattr(os, "memfd_create", None)
    if create is None:
        return None
    try:
        fd: int = create("odata-auth-proxy-client-cert", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:
        return None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if os.path.exists(f"/proc/self/fd/{fd}"):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


# --------------------------------------------------------------------------------------------- loading


def _read(material: Material) -> bytes:
    where = material.origin
    if material.path and material.path not in where:
        where = f"{where} ({material.path})"
    try:
        return material.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{where}: file not found: check the path") from None
    except IsADirectoryError:
        raise CertificateError(f"{where}: is a directory, not a file: give the file inside it") from None
    except PermissionError:
        raise CertificateError(f"{where}: permission denied: check the file's owner and mode") from None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise CertificateError(f"{where}: cannot read the file ({reason})") from None


def _looks_like_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data


def _bare_base64(data: bytes) -> bytes | None:
    """DER given as bare base64 text (no PEM armour), or None."""
    text = "".join(_as_text(data).split()).strip("\"'")
    if not text or not _BASE64_RE.fullmatch(text):
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        return None


def _der_candidates(data: bytes) -> list[bytes]:
    candidates = [data] if data[:1] == b"\x30" else []
    decoded = _bare_base64(data)
    if decoded is not None and decoded[:1] == b"\x30":
        candidates.append(decoded)
    return candidates


def _certificates(material: Material, data: bytes) -> list[x509.Certificate]:
    """All certificates in ``data`` (PEM with any line-break spelling, or one DER certificate)."""
    if _looks_like_pem(data):
        blocks = _parse_pem(data, material.origin)
        certs: list[x509.Certificate] = []
        for block in blocks:
            if block.label not in ("CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE"):
                continue
            try:
                certs.append(x509.load_der_x509_certificate(block.der))
            except ValueError:
                if block.label == "TRUSTED CERTIFICATE":
                    continue
                raise CertificateError(
                    f"{material.origin}: certificate {len(certs) + 1} is not a valid X.509 certificate "
                    "(damaged PEM?): paste it again exactly as issued"
                ) from None
        return certs
    for der in _der_candidates(data):
        with contextlib.suppress(ValueError):
            return [x509.load_der_x509_certificate(der)]
    return []


def _password_bytes(password: Secret | None) -> bytes | None:
    return password.reveal().encode() if password else None


def _check_key_type(key: object, origin: str) -> ClientKey:
    if not isinstance(key, _CLIENT_KEY_TYPES):
        raise CertificateError(
            f"{origin}: a {key.__class__.__name__} key cannot sign for TLS client authentication: use an RSA or EC key"
        )
    return key


def _load_key_block(block: _PemBlock, material: Material, password: Secret | None) -> ClientKey:
    origin = material.origin
    if block.label == "OPENSSH PRIVATE KEY":
        raise CertificateError(
            f"{origin}: this is an OpenSSH key, not a TLS key: give the PEM/PKCS#8 key that belongs to the certificate"
        )
    if block.is_encrypted and not password:
        raise CertificateError(f"private key {origin} is encrypted: {_KEY_PASSWORD_HINT}")
    pw = _password_bytes(password) if block.is_encrypted else None
    try:
        key = serialization.load_pem_private_key(block.pem(), pw)
    except (TypeError, ValueError, UnsupportedAlgorithm) as exc:
        if block.is_encrypted and isinstance(exc, ValueError) and "password" in str(exc).lower():
            raise CertificateError(
                f"the key password is wrong for {origin}: check key_password, key_password_file "
                "or ODATA_AUTH_PROXY_KEY_PASSWORD"
            ) from None
        if isinstance(exc, TypeError) and not password:
            raise CertificateError(f"private key {origin} is encrypted: {_KEY_PASSWORD_HINT}") from None
        raise CertificateError(
            f"{origin}: the {block.label} block is not a usable private key (damaged, or an unsupported "
            "algorithm): paste it again exactly as issued"
        ) from None
    return _check_key_type(key, origin)


def _load_der_key(data: bytes, material: Material, password: Secret | None) -> ClientKey | None:
    for der in _der_candidates(data):
        try:
            key = serialization.load_der_private_key(der, None)
        except TypeError:  # encrypted
            if not password:
                raise CertificateError(f"private key {material.origin} is encrypted: {_KEY_PASSWORD_HINT}") from None
            try:
                key = serialization.load_der_private_key(der, _password_bytes(password))
            except (TypeError, ValueError, UnsupportedAlgorithm):
                raise CertificateError(
                    f"the key password is wrong for {material.origin}: check key_password, "
                    "key_password_file or ODATA_AUTH_PROXY_KEY_PASSWORD"
                ) from None
        except (ValueError, UnsupportedAlgorithm):
            continue
        return _check_key_type(key, material.origin)
    return None


def _private_key(material: Material, data: bytes, password: Secret | None) -> ClientKey | None:
    """The one private key in ``data``, or None when there is none."""
    if _looks_like_pem(data):
        blocks = [b for b in _parse_pem(data, material.origin) if b.is_private_key]
        if not blocks:
            return None
        if len(blocks) > 1:
            raise CertificateError(
                f"{material.origin}: contains {len(blocks)} private keys: give only the key that belongs "
                "to the certificate"
            )
        return _load_key_block(blocks[0], material, password)
    return _load_der_key(data, material, password)


@dataclass
class _Bundle:
    certs: list[x509.Certificate]
    key: ClientKey | None


def _load_pkcs12(material: Material, password: Secret | None) -> _Bundle:
    data = _read(material)
    if material.text is not None and data[:1] != b"\x30":
        decoded = _bare_base64(data)
        if decoded is None:
            raise CertificateError(
                f"{material.origin}: inline PKCS#12 must be base64 text: give the .p12/.pfx file path instead"
            )
        data = decoded
    attempts = [_password_bytes(password)] if password else [None, b""]
    error = ""
    for attempt in attempts:
        try:
            bundle = pkcs12.load_pkcs12(data, attempt)
            break
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            error = str(exc).lower()
    else:
        if "password" not in error:
            raise CertificateError(
                f"{material.origin}: not a PKCS#12 (.p12/.pfx) bundle, or it is damaged: "
                "export it again, or give PEM certificate and key files instead"
            )
        if password:
            raise CertificateError(
                f"the password is wrong for {material.origin} (or the bundle is damaged): check pkcs12_password"
            )
        raise CertificateError(f"{material.origin} is protected by a password: set pkcs12_password")
    certs = [bundle.cert.certificate] if bundle.cert is not None else []
    certs += [extra.certificate for extra in bundle.additional_certs]
    key = _check_key_type(bundle.key, material.origin) if bundle.key is not None else None
    return _Bundle(certs, key)


def _order(certs: list[x509.Certificate], leaf: x509.Certificate) -> tuple[x509.Certificate, ...]:
    """Leaf first, then each certificate's issuer as found in ``certs``; unlinked ones keep their order."""
    rest: list[x509.Certificate] = []
    for cert in certs:
        if cert != leaf and cert not in rest:
            rest.append(cert)
    ordered = [leaf]
    while rest and not _is_self_signed(ordered[-1]):
        issuer = next((c for c in rest if c.subject == ordered[-1].issuer), None)
        if issuer is None:
            break
        ordered.append(issuer)
        rest.remove(issuer)
    return (*ordered, *rest)


def load_client_identity(spec: CertificateSpec, now: datetime | None = None) -> ClientIdentity:
    """Load and check the client certificate chain and key described by ``spec``.

    Either ``certificate`` + ``key`` (PEM in any spelling, or DER; keys PKCS#1, PKCS#8, encrypted PKCS#8,
    SEC1 EC, legacy encrypted PEM) or a ``pkcs12`` bundle; a separate ``certificate`` (or ``key``)
    replaces the one from the bundle. A certificate file that also holds the key needs no ``key``.
    The certificate matching the key is moved first and the chain put in issuer order. Raises
    :class:`CertificateError` for anything that would make the TLS handshake fail.
    """
    now = now or datetime.now(UTC)
    certs: list[x509.Certificate] = []
    key: ClientKey | None = None
    cert_origin = key_origin = ""

    if spec.pkcs12 is not None:
        bundle = _load_pkcs12(spec.pkcs12, spec.pkcs12_password)
        certs, key = bundle.certs, bundle.key
        cert_origin = key_origin = spec.pkcs12.origin

    if spec.certificate is not None:
        cert_data = _read(spec.certificate)
        given = _certificates(spec.certificate, cert_data)
        if not given:
            hint = ""
            if _looks_like_pem(cert_data) and any(
                b.is_private_key for b in _parse_pem(cert_data, spec.certificate.origin)
            ):
                hint = " (it holds a private key: are certificate and key swapped?)"
            raise CertificateError(
                f"{spec.certificate.origin}: no certificate found{hint}: expected a PEM certificate "
                "starting with -----BEGIN CERTIFICATE-----"
            )
        certs, cert_origin = given, spec.certificate.origin
        if spec.key is None and key is None:
            key = _private_key(spec.certificate, cert_data, spec.key_password)
            key_origin = spec.certificate.origin

    if spec.key is not None:
        key_data = _read(spec.key)
        key = _private_key(spec.key, key_data, spec.key_password)
        if key is None:
            raise CertificateError(
                f"{spec.key.origin}: no private key found: expected PEM text starting with "
                "-----BEGIN PRIVATE KEY----- (or RSA/EC/ENCRYPTED PRIVATE KEY)"
            )
        key_origin = spec.key.origin
        if not certs:
            certs, cert_origin = _certificates(spec.key, key_data), spec.key.origin

    if not certs:
        if spec.pkcs12 is not None:
            raise CertificateError(f"{spec.pkcs12.origin}: the bundle holds no certificate: export it again")
        raise CertificateError("no client certificate given: set credentials.certificate (PEM) or credentials.pkcs12")
    if key is None:
        raise CertificateError(f"client certificate from {cert_origin} has no private key: {_NO_KEY_HINT}")

    key_spki = _spki(key.public_key())
    leaf = next((c for c in certs if _spki(c.public_key()) == key_spki), None)
    if leaf is None:
        first = certs[0]
        raise CertificateError(
            f"the private key ({key_origin}) does not match the certificate ({cert_origin}): "
            f"certificate subject {first.subject.rfc4514_string()}, SHA-256 {_fingerprint(first)}"
        )

    identity = ClientIdentity(_order(certs, leaf), cert_origin, key_origin, key)
    who = f"client certificate {identity.subject} ({cert_origin})"
    if identity.not_after < now:
        raise CertificateError(f"{who} expired on {_date(identity.not_after)}: {_RENEW_HINT}")
    not_before = leaf.not_valid_before_utc
    if not_before > now:
        raise CertificateError(
            f"{who} is not valid before {not_before.isoformat(timespec='seconds')}: check the system clock, "
            "or wait until then"
        )
    return identity


def key_file_permission_warning(material: Material | None) -> str | None:
    """A chmod hint when a private key file is accessible by group or others, else None."""
    if material is None or material.path is None or material.text is not None or os.name == "nt":
        return None
    path = os.path.expanduser(material.path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"private key file {material.path} is readable by group/others (mode {mode:04o}): run chmod 600 {material.path}"
    )
