"""``odata-auth-proxy keyring add|list|remove``: keep downloaded service keys in the OS keychain instead of files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxy.credentials import CertificateSpec, Material
from proxy.keychain import PREFIX, Keychain, KeychainError, KeychainUnavailable, StoredKey, check_name
from proxy.servicekey import ServiceKey, ServiceKeyError, load_service_key_file, parse_service_key_text

EXIT_OK = 0
EXIT_FAILURE = 1  # the same codes as proxy.cli (not imported: cli imports this module)
EXIT_CONFIG = 2

EXAMPLES = """examples:
  odata-auth-proxy keyring add cpi-dev ~/Downloads/cpi-api-key.json
  odata-auth-proxy keyring add cpi-ext ext-key.json --key client.key   # External Certificate key + its private key
  odata-auth-proxy keyring list
  odata-auth-proxy run --service-key keyring:cpi-dev
  odata-auth-proxy keyring remove cpi-dev
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = sub.add_parser(
        "keyring",
        help="keep service keys in the OS keychain (macOS Keychain, Windows Credential Locker, Secret Service)",
        description="Store downloaded service keys in the OS keychain and use them with --service-key keyring:NAME.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = cmd.add_subparsers(dest="keyring_command", metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="store a service key file (validated first)",
        description="Validate a service key file and store it in the OS keychain under NAME (replacing one of the "
        "same name). For an External Certificate key, --key stores your PEM private key with it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("name", metavar="NAME", help="name to use it by: --service-key keyring:NAME")
    add.add_argument("file", metavar="FILE", help="the service key JSON, exactly as downloaded")
    add.add_argument("--key", metavar="PEM", help="PEM private key of an External Certificate key, stored with it")
    actions.add_parser(
        "list",
        help="show the stored keys (never a secret)",
        description="Show name, kind, client id and token URL of every stored key; never a secret.",
    )
    remove = actions.add_parser("remove", help="delete a stored key", description="Delete a stored key.")
    remove.add_argument("name", metavar="NAME")


def _error(message: str) -> None:
    print(f"odata-auth-proxy: error: {message}", file=sys.stderr)


def cmd_keyring(args: argparse.Namespace) -> int:
    action = getattr(args, "keyring_command", None)
    if action is None:
        _error("keyring: give an action: add NAME FILE [--key PEM], list, or remove NAME")
        return EXIT_CONFIG
    try:
        if action == "add":
            return _add(args.name, args.file, args.key)
        if action == "list":
            return _list()
        return _remove(args.name)
    except KeychainUnavailable as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except (KeychainError, ServiceKeyError) as exc:
        _error(str(exc))
        return EXIT_CONFIG


def _read_private_key(path: str) -> str:
    """The PEM text of ``--key``; refused when it is not a PEM private key."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise KeychainError(f"--key {path}: file not found") from None
    except UnicodeDecodeError:
        raise KeychainError(
            f"--key {path}: not PEM text (DER?): convert it with openssl pkey -in {path} -out key.pem"
        ) from None
    except OSError as exc:
        raise KeychainError(f"--key {path}: cannot read it ({exc.__class__.__name__})") from None
    if "PRIVATE KEY-----" not in text:
        raise KeychainError(f"--key {path}: no PEM private key in it (expected -----BEGIN … PRIVATE KEY-----)")
    return text


def _check_certificate(key: ServiceKey, private_key: Material | None) -> None:
    """Refuse a certificate key whose private key does not match or whose certificate expired (as ``run`` does)."""
    from proxy.certificates import CertificateError, load_client_identity  # cryptography: only when needed

    pkey = private_key or key.key
    if key.certificate is None or pkey is None:
        return
    try:
        load_client_identity(CertificateSpec(certificate=key.certificate, key=pkey))
    except CertificateError as exc:
        if "is encrypted" in str(exc):
            return  # checked at run time, with key_password / ODATA_AUTH_PROXY_KEY_PASSWORD
        raise KeychainError(str(exc)) from None


def _add(name: str, file: str, key_file: str | None) -> int:
    check_name(name)
    key = load_service_key_file(file)  # the parser's own errors, e.g. missing "oauth.tokenurl"
    text = Path(file).expanduser().read_text(encoding="utf-8-sig")
    key = parse_service_key_text(text, key.source)  # the very text stored
    pem: str | None = None
    if key_file is not None:
        if key.kind != "external-certificate":
            what = "a client secret" if key.kind == "secret" else "its own private key"
            raise KeychainError(
                f"--key {key_file}: {key.source} holds {what}: --key is only for an External Certificate key"
            )
        pem = _read_private_key(key_file)
    _check_certificate(key, Material.inline(pem, f"--key {key_file}") if pem is not None else None)

    keychain = Keychain.open()
    replaced = keychain.store(name, text, key, pem)
    extra = ", with its private key" if pem is not None else ""
    print(
        f'{"replaced" if replaced else "stored"} service key "{name}" in the OS keychain ({keychain.label}): '
        f"{key.kind}{extra}, client id {key.client_id}, token {key.token_url}"
    )
    print(f"you may now delete the downloaded file {file}: the proxy reads the key from the keychain")
    if pem is not None:
        print(
            f"the proxy no longer needs {key_file} either; keep a backup of it somewhere safe (unlike the service "
            "key, it cannot be downloaded again)"
        )
    elif key.kind == "external-certificate":
        print(
            "note: an External Certificate key holds no private key; give it at run time with --key FILE, or store "
            f"it with the key: odata-auth-proxy keyring add {name} {file} --key client.key"
        )
    print(f"use it with: odata-auth-proxy run --service-key {PREFIX}{name}")
    print(f"         or: service_key: {PREFIX}{name} (config), ODATA_AUTH_PROXY_SERVICE_KEY={PREFIX}{name}")
    return EXIT_OK


def _list() -> int:
    keychain = Keychain.open()
    entries = keychain.summaries()
    if not entries:
        print(
            f"no service keys stored (OS keychain: {keychain.label}); add one with: odata-auth-proxy keyring add "
            "NAME key.json"
        )
        return EXIT_OK
    rows = [("NAME", "KIND", "CLIENT ID", "TOKEN URL")]
    for entry in entries:
        if isinstance(entry, StoredKey):
            rows.append((entry.name, entry.kind_label, entry.client_id, entry.token_url))
        else:
            rows.append((entry, "(incomplete: add it again, or remove it)", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        print(f"{cells}  {row[3]}".rstrip())
    return EXIT_OK


def _remove(name: str) -> int:
    keychain = Keychain.open()
    keychain.remove(name)
    print(f'removed service key "{name}" from the OS keychain ({keychain.label})')
    return EXIT_OK
