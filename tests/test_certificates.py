"""Client certificates: every PEM spelling, every key format, clear errors, and a real mutual-TLS handshake."""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from proxy.certificates import (
    CertificateError,
    ClientIdentity,
    key_file_permission_warning,
    load_client_identity,
    normalize_pem,
)
from proxy.credentials import CertificateSpec, Material
from proxy.redact import Secret

SERVICE_KEYS = Path(__file__).parent / "fixtures" / "service-keys"
PASSWORD = "correct horse battery staple"


# --------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Pki:
    """A root CA, an intermediate CA, and client leaves (EC and RSA) issued by the intermediate."""

    root: trustme.CA
    intermediate: trustme.CA
    leaf: trustme.LeafCert
    rsa_leaf: trustme.LeafCert

    @property
    def root_pem(self) -> str:
        return str(self.root.cert_pem.bytes().decode())

    @property
    def intermediate_pem(self) -> str:
        return self.leaf.cert_chain_pems[1].bytes().decode()

    @property
    def leaf_pem(self) -> str:
        return self.leaf.cert_chain_pems[0].bytes().decode()

    @property
    def full_chain_pem(self) -> str:
        return self.leaf_pem + self.intermediate_pem + self.root_pem

    @property
    def key_pem(self) -> str:
        """SEC1 ("BEGIN EC PRIVATE KEY"), as trustme writes it."""
        return self.leaf.private_key_pem.bytes().decode()

    @property
    def key(self) -> Any:
        return serialization.load_pem_private_key(self.key_pem.encode(), None)

    @property
    def leaf_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.leaf_pem.encode())


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = trustme.CA(organization_name="Example Test Root CA")
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("client.example.invalid", common_name="test-client")
    rsa_leaf = intermediate.issue_cert(
        "rsa-client.example.invalid", common_name="rsa-client", key_type=trustme.KeyType.RSA
    )
    return Pki(root, intermediate, leaf, rsa_leaf)


def inline(text: str | bytes, origin: str = "test") -> Material:
    return Material.inline(text.decode() if isinstance(text, bytes) else text, origin)


def spec_for(cert: str, key: str, password: str | None = None) -> CertificateSpec:
    return CertificateSpec(
        certificate=inline(cert, "service key k.json: oauth.certificate"),
        key=inline(key, "service key k.json: oauth.key"),
        key_password=Secret(password) if password is not None else None,
    )


def key_as(key: Any, fmt: serialization.PrivateFormat, password: str | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    return str(key.private_bytes(serialization.Encoding.PEM, fmt, encryption).decode())


def base64_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


# -------------------------------------------------------------------------------------- PEM spellings


def lost_breaks_in_body(pem: str) -> str:
    """BEGIN/END on their own lines, base64 all on one line."""
    out: list[str] = []
    for line in pem.strip().splitlines():
        if line.startswith("-----") or not out or out[-1].startswith("-----"):
            out.append(line)
        else:
            out[-1] += line
    return "\n".join(out)


SPELLINGS: dict[str, Callable[[str], str]] = {
    "real-breaks": lambda s: s,
    "literal-backslash-n": lambda s: s.replace("\n", "\\n"),
    "crlf": lambda s: s.replace("\n", "\r\n"),
    "literal-backslash-r-n": lambda s: s.replace("\n", "\\r\\n"),
    "lost-breaks-in-body": lost_breaks_in_body,
    "one-line-with-spaces": lambda s: s.replace("\n", " "),
    "one-line-no-spaces": lambda s: s.replace("\n", ""),
    "surrounding-whitespace": lambda s: "\n\n   \t" + s + "   \n\n",
    "json-value-pasted-raw": lambda s: json.dumps(s)[1:-1],
    "json-value-pasted-with-quotes": lambda s: json.dumps(s),
    "json-escaped-slashes": lambda s: json.dumps(s)[1:-1].replace("/", "\\/"),
    "json-loads": lambda s: str(json.loads(json.dumps({"certificate": s}))["certificate"]),
    "double-escaped-json": lambda s: json.dumps(json.dumps(s)),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_normalize_pem_every_spelling(pki: Pki, spelling: str) -> None:
    for original in (pki.full_chain_pem, pki.key_pem, key_as(pki.key, serialization.PrivateFormat.PKCS8)):
        canonical = normalize_pem(original)
        assert canonical == original.encode()  # cryptography already writes canonical PEM
        assert normalize_pem(SPELLINGS[spelling](original)) == canonical
        assert normalize_pem(SPELLINGS[spelling](original).encode()) == canonical


def test_normalize_pem_rewraps_at_64_and_keeps_legacy_headers(pki: Pki) -> None:
    legacy = key_as(pki.key, serialization.PrivateFormat.TraditionalOpenSSL, PASSWORD)
    assert "Proc-Type: 4,ENCRYPTED" in legacy
    out = normalize_pem(legacy.replace("\n", " ")).decode()
    assert out == legacy
    wide = "-----BEGIN CERTIFICATE-----\n" + "".join(base64_lines(pki.leaf_pem)) + "\n-----END CERTIFICATE-----"
    lines = normalize_pem(wide).decode().splitlines()
    assert all(len(line) <= 64 for line in lines[1:-1])
    assert normalize_pem(wide) == pki.leaf_pem.encode()


def test_normalize_pem_errors() -> None:
    with pytest.raises(CertificateError, match="no PEM block"):
        normalize_pem("just some text")
    with pytest.raises(CertificateError, match="without its matching END"):
        normalize_pem("-----BEGIN CERTIFICATE-----\nMIIB\n")
    with pytest.raises(CertificateError, match="not base64"):
        normalize_pem("-----BEGIN CERTIFICATE-----\nMII%%B\n-----END CERTIFICATE-----\n")


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_load_identity_every_spelling_of_cert_and_key(pki: Pki, spelling: str) -> None:
    spell = SPELLINGS[spelling]
    identity = load_client_identity(spec_for(spell(pki.full_chain_pem), spell(pki.key_pem)))
    assert identity.chain[0] == pki.leaf_cert
    assert len(identity.chain) == 3
    assert "CN=test-client" in identity.subject


# ---------------------------------------------------------------------------------------- key formats


def test_pkcs1_rsa_key(pki: Pki) -> None:
    key_pem = pki.rsa_leaf.private_key_pem.bytes().decode()
    assert "BEGIN RSA PRIVATE KEY" in key_pem
    cert = pki.rsa_leaf.cert_chain_pems[0].bytes().decode() + pki.intermediate_pem
    identity = load_client_identity(spec_for(cert, key_pem))
    assert "CN=rsa-client" in identity.subject


def test_pkcs8_keys(pki: Pki) -> None:
    rsa_key = serialization.load_pem_private_key(pki.rsa_leaf.private_key_pem.bytes(), None)
    rsa_cert = pki.rsa_leaf.cert_chain_pems[0].bytes().decode()
    pkcs8 = key_as(rsa_key, serialization.PrivateFormat.PKCS8)
    assert "BEGIN PRIVATE KEY" in pkcs8
    assert load_client_identity(spec_for(rsa_cert, pkcs8)).chain[0].subject == (
        x509.load_pem_x509_certificate(rsa_cert.encode()).subject
    )
    ec_pkcs8 = key_as(pki.key, serialization.PrivateFormat.PKCS8)
    assert load_client_identity(spec_for(pki.full_chain_pem, ec_pkcs8)).chain[0] == pki.leaf_cert


def test_sec1_ec_key(pki: Pki) -> None:
    assert "BEGIN EC PRIVATE KEY" in pki.key_pem
    identity = load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem))
    assert isinstance(identity.private_key, ec.EllipticCurvePrivateKey)


def test_encrypted_pkcs8_right_password(pki: Pki) -> None:
    encrypted = key_as(pki.key, serialization.PrivateFormat.PKCS8, PASSWORD)
    assert "BEGIN ENCRYPTED PRIVATE KEY" in encrypted
    identity = load_client_identity(spec_for(pki.full_chain_pem, encrypted.replace("\n", "\\n"), PASSWORD))
    assert identity.chain[0] == pki.leaf_cert


def test_encrypted_pkcs8_wrong_password(pki: Pki) -> None:
    encrypted = key_as(pki.key, serialization.PrivateFormat.PKCS8, PASSWORD)
    with pytest.raises(CertificateError) as info:
        load_client_identity(spec_for(pki.full_chain_pem, encrypted, "wrong password"))
    message = str(info.value)
    assert "password is wrong for service key k.json: oauth.key" in message
    assert "wrong password" not in message and PASSWORD not in message


def test_encrypted_key_without_password(pki: Pki) -> None:
    encrypted = key_as(pki.key, serialization.PrivateFormat.PKCS8, PASSWORD)
    with pytest.raises(CertificateError) as info:
        load_client_identity(spec_for(pki.full_chain_pem, encrypted))
    message = str(info.value)
    assert "service key k.json: oauth.key" in message and "encrypted" in message
    for hint in ("key_password", "key_password_file", "ODATA_AUTH_PROXY_KEY_PASSWORD"):
        assert hint in message


def test_legacy_encrypted_pem_key_with_lost_line_breaks(pki: Pki) -> None:
    legacy = key_as(pki.key, serialization.PrivateFormat.TraditionalOpenSSL, PASSWORD)
    identity = load_client_identity(spec_for(pki.full_chain_pem, legacy.replace("\n", " "), PASSWORD))
    assert identity.chain[0] == pki.leaf_cert
    with pytest.raises(CertificateError, match="password is wrong"):
        load_client_identity(spec_for(pki.full_chain_pem, legacy, "nope"))


def test_password_given_for_unencrypted_key_is_ignored(pki: Pki) -> None:
    assert load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem, "unused")).chain[0] == pki.leaf_cert


def test_der_certificate_and_key_files(pki: Pki, tmp_path: Path) -> None:
    cert_path = tmp_path / "client.der"
    cert_path.write_bytes(pki.leaf_cert.public_bytes(serialization.Encoding.DER))
    key_path = tmp_path / "client.key.der"
    key_path.write_bytes(
        pki.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSWORD.encode()),
        )
    )
    spec = CertificateSpec(
        certificate=Material.from_file(str(cert_path)),
        key=Material.from_file(str(key_path)),
        key_password=Secret(PASSWORD),
    )
    identity = load_client_identity(spec)
    assert identity.chain == (pki.leaf_cert,)
    assert identity.cert_origin == f"file {cert_path}"


def test_certificate_file_that_also_holds_the_key(pki: Pki, tmp_path: Path) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_text(pki.key_pem + pki.full_chain_pem)
    identity = load_client_identity(CertificateSpec(certificate=Material.from_file(str(combined))))
    assert identity.chain[0] == pki.leaf_cert
    assert identity.key_origin == identity.cert_origin == f"file {combined}"


# ------------------------------------------------------------------------------------------- PKCS#12


def make_p12(pki: Pki, password: str | None) -> bytes:
    intermediate = x509.load_pem_x509_certificate(pki.intermediate_pem.encode())
    root = x509.load_pem_x509_certificate(pki.root_pem.encode())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    # Extra certificates deliberately out of order: the loader puts the chain in issuer order.
    return pkcs12.serialize_key_and_certificates(b"client", pki.key, pki.leaf_cert, [root, intermediate], encryption)


def p12_spec(path: Path, password: str | None) -> CertificateSpec:
    return CertificateSpec(
        pkcs12=Material.from_file(str(path)),
        pkcs12_password=Secret(password) if password is not None else None,
    )


def test_pkcs12_right_password(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "client.p12"
    path.write_bytes(make_p12(pki, PASSWORD))
    identity = load_client_identity(p12_spec(path, PASSWORD))
    root = x509.load_pem_x509_certificate(pki.root_pem.encode())
    assert identity.chain[0] == pki.leaf_cert
    assert identity.chain[-1] == root
    assert identity.chain_warning() is None
    assert identity.cert_origin == identity.key_origin == f"file {path}"


def test_pkcs12_wrong_and_missing_password(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "client.p12"
    path.write_bytes(make_p12(pki, PASSWORD))
    with pytest.raises(CertificateError, match=re.escape(f"password is wrong for file {path}")):
        load_client_identity(p12_spec(path, "bad"))
    with pytest.raises(CertificateError, match="pkcs12_password"):
        load_client_identity(p12_spec(path, None))


def test_pkcs12_without_password_and_inline_base64(pki: Pki, tmp_path: Path) -> None:
    data = make_p12(pki, None)
    path = tmp_path / "open.p12"
    path.write_bytes(data)
    assert load_client_identity(p12_spec(path, None)).chain[0] == pki.leaf_cert
    spec = CertificateSpec(pkcs12=inline(base64.b64encode(data).decode(), "env ODATA_AUTH_PROXY_PKCS12"))
    assert load_client_identity(spec).chain[0] == pki.leaf_cert


def test_pkcs12_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.p12"
    path.write_bytes(b"\x30\x03\x02\x01\x00")
    with pytest.raises(CertificateError, match="not a PKCS#12"):
        load_client_identity(p12_spec(path, None))


def test_separate_certificate_overrides_pkcs12_chain(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "client.p12"
    path.write_bytes(make_p12(pki, PASSWORD))
    spec = CertificateSpec(
        certificate=inline(pki.leaf_pem + pki.intermediate_pem, "cert.pem"),
        pkcs12=Material.from_file(str(path)),
        pkcs12_password=Secret(PASSWORD),
    )
    identity = load_client_identity(spec)
    assert len(identity.chain) == 2
    assert identity.cert_origin == "cert.pem"
    assert identity.key_origin == f"file {path}"


# ------------------------------------------------------------------------------------------- errors


def test_mismatched_key_names_certificate_but_never_key_text(pki: Pki) -> None:
    other_key = pki.rsa_leaf.private_key_pem.bytes().decode()
    with pytest.raises(CertificateError) as info:
        load_client_identity(spec_for(pki.full_chain_pem, other_key))
    message = str(info.value)
    leaf = pki.leaf_cert
    fingerprint = ":".join(f"{b:02X}" for b in leaf.fingerprint(hashes.SHA256()))
    assert message.startswith(
        "the private key (service key k.json: oauth.key) does not match the certificate "
        "(service key k.json: oauth.certificate)"
    )
    assert leaf.subject.rfc4514_string() in message
    assert fingerprint in message
    assert "PRIVATE KEY" not in message
    assert "\n" not in message
    for line in base64_lines(other_key):
        assert line not in message
    assert info.value.__cause__ is None


def test_key_matching_a_later_certificate_is_moved_first(pki: Pki) -> None:
    shuffled = pki.root_pem + pki.intermediate_pem + pki.leaf_pem
    identity = load_client_identity(spec_for(shuffled, pki.key_pem))
    assert [c.subject for c in identity.chain] == [
        x509.load_pem_x509_certificate(p.encode()).subject for p in (pki.leaf_pem, pki.intermediate_pem, pki.root_pem)
    ]


def test_no_key_given(pki: Pki) -> None:
    spec = CertificateSpec(certificate=inline(pki.full_chain_pem, "service key k.json: oauth.certificate"))
    with pytest.raises(CertificateError) as info:
        load_client_identity(spec)
    assert str(info.value) == (
        "client certificate from service key k.json: oauth.certificate has no private key: "
        "give the key file with --key FILE or credentials.key"
    )


def test_not_a_certificate(pki: Pki) -> None:
    with pytest.raises(CertificateError, match=re.escape("cert.pem: no certificate found")):
        load_client_identity(CertificateSpec(certificate=inline("hello", "cert.pem"), key=inline(pki.key_pem)))
    with pytest.raises(CertificateError, match="swapped") as info:
        load_client_identity(spec_for(pki.key_pem, pki.full_chain_pem))
    assert "PRIVATE KEY-----" not in str(info.value)


def test_damaged_certificate(pki: Pki) -> None:
    damaged = "-----BEGIN CERTIFICATE-----\nMIIBIjANBgkq\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateError, match=re.escape("not a valid X.509 certificate")):
        load_client_identity(spec_for(damaged, pki.key_pem))


def test_missing_files_are_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    spec = CertificateSpec(certificate=Material.from_file(str(missing)), key=inline(pki.key_pem))
    with pytest.raises(CertificateError, match=re.escape(f"file {missing}: file not found")):
        load_client_identity(spec)
    spec = CertificateSpec(certificate=inline(pki.full_chain_pem), key=Material.from_file(str(tmp_path)))
    with pytest.raises(CertificateError, match="is a directory"):
        load_client_identity(spec)


def test_expired_certificate_is_refused_with_date(pki: Pki) -> None:
    expired = pki.intermediate.issue_cert(
        "old.example.invalid",
        common_name="old-client",
        not_before=datetime(2020, 1, 1, tzinfo=UTC),
        not_after=datetime(2021, 3, 4, tzinfo=UTC),
    )
    spec = spec_for(expired.cert_chain_pems[0].bytes().decode(), expired.private_key_pem.bytes().decode())
    with pytest.raises(CertificateError) as info:
        load_client_identity(spec)
    message = str(info.value)
    assert "CN=old-client" in message
    assert "(service key k.json: oauth.certificate) expired on 2021-03-04" in message
    assert "renew" in message


def test_not_yet_valid_certificate(pki: Pki) -> None:
    with pytest.raises(CertificateError, match="is not valid before 2000-01-01"):
        load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem), now=datetime(1999, 6, 1, tzinfo=UTC))


# --------------------------------------------------------------------------------- identity details


def test_identity_properties_and_repr(pki: Pki) -> None:
    identity = load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem))
    leaf = pki.leaf_cert
    assert identity.subject == leaf.subject.rfc4514_string()
    assert identity.issuer == leaf.issuer.rfc4514_string()
    assert identity.fingerprint_sha256 == leaf.fingerprint(hashes.SHA256()).hex(":").upper()
    assert identity.not_after == leaf.not_valid_after_utc
    assert identity.not_after.tzinfo is not None
    assert identity.not_after_timestamp == leaf.not_valid_after_utc.timestamp()
    summary = identity.chain_summary()
    assert len(summary) == 3
    assert summary[0].startswith(f"subject={identity.subject}, issuer={identity.issuer}, notAfter=")
    text = repr(identity) + str(identity)
    assert "PRIVATE" not in text and "private_key" not in text
    for line in base64_lines(pki.key_pem):
        assert line not in text


def test_expiry_warning(pki: Pki) -> None:
    identity = load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem))
    date = identity.not_after.date().isoformat()
    soon = identity.not_after - timedelta(days=10, hours=1)
    warning = identity.expiry_warning(now=soon)
    assert warning is not None
    assert warning.startswith(f"client certificate {identity.subject} (service key k.json: oauth.certificate)")
    assert f"expires in 10 days on {date}" in warning and "renew" in warning
    assert identity.expiry_warning(now=identity.not_after - timedelta(days=31)) is None
    assert identity.expiry_warning(now=soon, days=5) is None
    assert identity.expiry_warning() is None


def test_chain_warning(pki: Pki) -> None:
    full = load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem))
    assert full.chain_warning() is None

    alone = load_client_identity(spec_for(pki.leaf_pem, pki.key_pem))
    warning = alone.chain_warning()
    assert warning is not None
    assert "root" in warning and "load balancer" in warning and "append" in warning

    below_root = load_client_identity(spec_for(pki.leaf_pem + pki.intermediate_pem, pki.key_pem))
    warning = below_root.chain_warning()
    assert warning is not None
    assert "below its root" in warning and "including the root" in warning


def test_chain_warning_self_signed_leaf() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=100))
        .sign(key, hashes.SHA256())
    )
    identity = ClientIdentity((cert,), "cert.pem", "key.pem", key)
    warning = identity.chain_warning()
    assert warning is not None and "self-signed" in warning


def test_sample_service_key_with_sap_generated_certificate() -> None:
    path = SERVICE_KEYS / "api-plan-certificate.json"
    oauth = json.loads(path.read_text())["oauth"]
    identity = load_client_identity(
        CertificateSpec(
            certificate=Material.inline(oauth["certificate"], f"service key {path.name}: oauth.certificate"),
            key=Material.inline(oauth["key"], f"service key {path.name}: oauth.key"),
        )
    )
    assert len(identity.chain) == 3
    assert "CN=sb-7f3e2c1a-demo!b12345|it!b67890" in identity.subject
    assert identity.chain_warning() is None
    assert identity.expiry_warning() is None


def test_sample_service_key_with_external_certificate() -> None:
    path = SERVICE_KEYS / "api-plan-external-certificate.json"
    oauth = json.loads(path.read_text())["oauth"]
    key_file = SERVICE_KEYS / "external-client.key.pem"
    identity = load_client_identity(
        CertificateSpec(
            certificate=Material.inline(oauth["certificate"], f"service key {path.name}: oauth.certificate"),
            key=Material.from_file(str(key_file)),
        )
    )
    assert "CN=my-cpi-api-client" in identity.subject
    assert identity.key_origin == f"file {key_file}"
    assert identity.chain_warning() is None


# ----------------------------------------------------------------------------------------- file modes


def test_key_file_permission_warning(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    path.write_text(pki.key_pem)
    path.chmod(0o644)
    assert key_file_permission_warning(Material.from_file(str(path))) == (
        f"private key file {path} is readable by group/others (mode 0644): run chmod 600 {path}"
    )
    path.chmod(0o600)
    assert key_file_permission_warning(Material.from_file(str(path))) is None
    assert key_file_permission_warning(inline(pki.key_pem)) is None
    assert key_file_permission_warning(None) is None
    assert key_file_permission_warning(Material.from_file(str(tmp_path / "missing"))) is None


# ---------------------------------------------------------------------------------- loading into ssl


@pytest.fixture
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point tempfile.gettempdir() at an empty directory, so any file left behind is seen."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    assert tempfile.gettempdir() == str(directory)
    yield directory


class SpyContext(ssl.SSLContext):
    """Records what load_cert_chain was given to read."""

    seen: list[tuple[str, bytes, int, int]]

    def load_cert_chain(
        self,
        certfile: Any,
        keyfile: Any = None,
        password: Any = None,
    ) -> None:
        path = str(certfile)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        dir_mode = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
        self.seen = [*getattr(self, "seen", []), (path, Path(path).read_bytes(), mode, dir_mode)]
        super().load_cert_chain(certfile, keyfile, password)


def assert_only_encrypted_key(data: bytes, pki: Pki) -> None:
    text = data.decode()
    assert "BEGIN ENCRYPTED PRIVATE KEY" in text
    assert "BEGIN EC PRIVATE KEY" not in text and "BEGIN PRIVATE KEY" not in text
    for line in base64_lines(pki.key_pem):
        assert line not in text
    assert text.count("BEGIN CERTIFICATE") == 3


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd_create is Linux-only")
def test_apply_to_uses_memfd_and_leaves_no_files(pki: Pki, private_tempdir: Path) -> None:
    identity = load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem))
    ctx = SpyContext(ssl.PROTOCOL_TLS_CLIENT)
    identity.apply_to(ctx)
    [(path, data, _, _)] = ctx.seen
    assert path.startswith("/proc/self/fd/")
    assert not os.path.exists(path) or "memfd:" not in os.readlink(path)  # the fd was closed
    assert_only_encrypted_key(data, pki)
    assert list(private_tempdir.iterdir()) == []


def test_apply_to_fallback_private_temp_file(pki: Pki, private_tempdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    identity = load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem))
    ctx = SpyContext(ssl.PROTOCOL_TLS_CLIENT)
    identity.apply_to(ctx)
    [(path, data, mode, dir_mode)] = ctx.seen
    assert Path(path).parent.parent == private_tempdir
    assert mode == 0o600 and dir_mode == 0o700
    assert_only_encrypted_key(data, pki)
    assert list(private_tempdir.iterdir()) == []


def test_apply_to_rejected_by_openssl_is_a_certificate_error(pki: Pki) -> None:
    identity = load_client_identity(spec_for(pki.full_chain_pem, pki.key_pem))

    class Refusing(ssl.SSLContext):
        def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
            raise ssl.SSLError(1, "[SSL: EE_KEY_TOO_SMALL] ee key too small")

    with pytest.raises(CertificateError, match="OpenSSL refused client certificate"):
        identity.apply_to(Refusing(ssl.PROTOCOL_TLS_CLIENT))


# ------------------------------------------------------------------------------ real mutual TLS


async def _peer_subject(request: web.Request) -> web.Response:
    assert request.transport is not None
    peercert = request.transport.get_extra_info("peercert")
    subject = {k: v for rdn in peercert["subject"] for k, v in rdn}
    return web.json_response(subject)


@pytest.fixture
async def mtls_server(pki: Pki) -> Any:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.root.issue_cert("127.0.0.1").configure_cert(server_ctx)
    pki.root.configure_trust(server_ctx)  # trusts the root only: the client must send the intermediate
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_get("/", _peer_subject)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    yield f"https://127.0.0.1:{port}/"
    await runner.cleanup()


def client_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    pki.root.configure_trust(ctx)
    return ctx


async def test_mutual_tls_handshake_with_chain(pki: Pki, mtls_server: str, private_tempdir: Path) -> None:
    identity = load_client_identity(spec_for(pki.leaf_pem + pki.intermediate_pem, pki.key_pem))
    ctx = client_context(pki)
    identity.apply_to(ctx)
    assert list(private_tempdir.iterdir()) == []
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout) as session,
        session.get(mtls_server) as response,
    ):
        assert response.status == 200
        subject = await response.json()
    assert subject["commonName"] == "test-client"
    assert subject["organizationalUnitName"] in identity.subject


async def test_mutual_tls_handshake_fails_without_client_certificate(pki: Pki, mtls_server: str) -> None:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_context(pki)), timeout=timeout
    ) as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(mtls_server) as response:
                await response.read()


async def test_mutual_tls_leaf_alone_is_rejected_when_server_trusts_only_the_root(pki: Pki, mtls_server: str) -> None:
    identity = load_client_identity(spec_for(pki.leaf_pem, pki.key_pem))
    assert identity.chain_warning() is not None
    ctx = client_context(pki)
    identity.apply_to(ctx)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout) as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(mtls_server) as response:
                await response.read()
