"""SAP BTP service keys: every downloadable shape parses, and every broken key gets a one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.credentials import Material
from proxy.redact import Secret
from proxy.servicekey import (
    ServiceKey,
    ServiceKeyError,
    load_service_key_file,
    parse_service_key,
    parse_service_key_text,
)

SERVICE_KEYS = Path(__file__).parent / "fixtures" / "service-keys"

API_HOST = "https://mytenant.it-cpi018.cfapps.eu10-003.hana.ondemand.com"
AUTH_HOST = "https://mysubaccount.authentication.eu10.hana.ondemand.com"
CERT_AUTH_HOST = "https://mysubaccount.authentication.cert.eu10.hana.ondemand.com"


def sample(name: str) -> Path:
    return SERVICE_KEYS / name


def sample_data(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sample(name).read_text(encoding="utf-8"))
    return data


def write_key(tmp_path: Path, data: Any, name: str = "key.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def oauth_key(**fields: Any) -> dict[str, Any]:
    """A minimal valid api-plan secret key, with ``fields`` replacing / removing (None) entries."""
    oauth: dict[str, Any] = {
        "clientid": "sb-client!b1",
        "clientsecret": "FAKE-secret-value-42",
        "url": "https://api.example.com",
        "tokenurl": "https://auth.example.com/oauth/token",
    }
    for name, value in fields.items():
        if value is None:
            oauth.pop(name, None)
        else:
            oauth[name] = value
    return {"oauth": oauth}


def expect_error(data: Any, label: str = "service key k.json") -> str:
    with pytest.raises(ServiceKeyError) as info:
        parse_service_key(data, label)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(label + ": "), message
    return message


# --------------------------------------------------------------------------- the sample shapes


def test_api_plan_secret() -> None:
    key = load_service_key_file(str(sample("api-plan-secret.json")))
    assert key.kind == "secret"
    assert key.client_id == "sb-0a1b2c3d-4e5f-6789-abcd-ef0123456789!b12345|it!b67890"
    assert key.token_url == f"{AUTH_HOST}/oauth/token"
    assert key.upstream_url == API_HOST
    assert isinstance(key.client_secret, Secret)
    assert key.client_secret.reveal() == "11111111-2222-3333-4444-555555555555$FAKE-not-a-real-secret="
    assert key.certificate is None
    assert key.key is None
    assert key.source == f"service key {sample('api-plan-secret.json')}"


def test_api_plan_certificate() -> None:
    data = sample_data("api-plan-certificate.json")
    key = load_service_key_file(str(sample("api-plan-certificate.json")))
    assert key.kind == "certificate"
    assert key.client_id == "sb-7f3e2c1a-demo!b12345|it!b67890"
    assert key.token_url == f"{CERT_AUTH_HOST}/oauth/token"
    assert key.upstream_url == API_HOST
    assert key.client_secret is None
    assert isinstance(key.certificate, Material)
    assert isinstance(key.key, Material)
    assert key.certificate.text == data["oauth"]["certificate"].strip()
    assert key.certificate.text is not None
    assert key.certificate.text.startswith("-----BEGIN CERTIFICATE-----")
    assert key.certificate.path is None
    assert key.key.text == data["oauth"]["key"].strip()
    assert key.key.path is None
    assert key.certificate.origin.endswith(": oauth.certificate")
    assert key.key.origin.endswith(": oauth.key")


def test_api_plan_external_certificate() -> None:
    key = load_service_key_file(str(sample("api-plan-external-certificate.json")))
    assert key.kind == "external-certificate"
    assert key.client_id == "sb-9e8d7c6b-ext!b12345|it!b67890"
    assert key.token_url == f"{CERT_AUTH_HOST}/oauth/token"
    assert key.upstream_url == API_HOST
    assert key.client_secret is None
    assert key.certificate is not None
    assert key.certificate.text is not None
    assert "-----BEGIN CERTIFICATE-----" in key.certificate.text
    assert key.key is None


def test_xsuaa_secret() -> None:
    key = load_service_key_file(str(sample("xsuaa-secret.json")))
    assert key.kind == "secret"
    assert key.client_id == "sb-myapp!t12345"
    assert key.token_url == f"{AUTH_HOST}/oauth/token"
    assert key.upstream_url is None
    assert key.client_secret == Secret("FAKE-xsuaa-secret-value")
    assert key.certificate is None


def test_xsuaa_x509_uses_certurl() -> None:
    key = load_service_key_file(str(sample("xsuaa-x509.json")))
    assert key.kind == "certificate"
    assert key.client_id == "sb-myapp!t12345"
    assert key.token_url == f"{CERT_AUTH_HOST}/oauth/token"
    assert key.upstream_url is None
    assert key.client_secret is None
    assert key.certificate is not None and key.key is not None
    assert key.key.text is not None and "PRIVATE KEY" in key.key.text


def test_xsuaa_x509_without_certurl_falls_back_to_url() -> None:
    data = sample_data("xsuaa-x509.json")
    del data["certurl"]
    key = parse_service_key(data, "k")
    assert key.token_url == f"{AUTH_HOST}/oauth/token"


def test_xsuaa_x509_without_key_is_external_certificate() -> None:
    data = sample_data("xsuaa-x509.json")
    del data["key"]
    key = parse_service_key(data, "k")
    assert key.kind == "external-certificate"
    assert key.key is None


def test_xsuaa_x509_without_certificate() -> None:
    data = sample_data("xsuaa-x509.json")
    del data["certificate"]
    message = expect_error(data)
    assert message == 'service key k.json: missing "certificate" (credential-type is x509)'


def test_uaa_nested() -> None:
    key = load_service_key_file(str(sample("uaa-nested.json")))
    assert key.kind == "secret"
    assert key.client_id == "sb-abap!b1"
    assert key.token_url == f"{AUTH_HOST}/oauth/token"
    assert key.upstream_url == "https://my-abap-system.abap.eu10.hana.ondemand.com"
    assert key.client_secret == Secret("FAKE-nested-secret")


def test_uaa_nested_without_outer_url_has_no_upstream() -> None:
    data = sample_data("uaa-nested.json")
    del data["url"]
    key = parse_service_key(data, "k")
    assert key.upstream_url is None
    assert key.token_url == f"{AUTH_HOST}/oauth/token"


def test_uaa_nested_outer_url_trailing_slash_stripped() -> None:
    data = sample_data("uaa-nested.json")
    data["url"] = "https://my-abap-system.abap.eu10.hana.ondemand.com/"
    assert parse_service_key(data, "k").upstream_url == "https://my-abap-system.abap.eu10.hana.ondemand.com"


def test_uaa_nested_errors_name_the_nested_field() -> None:
    data = sample_data("uaa-nested.json")
    del data["uaa"]["clientsecret"]
    assert expect_error(data) == 'service key k.json: missing "uaa.clientsecret"'


def test_uaa_nested_bad_outer_url() -> None:
    data = sample_data("uaa-nested.json")
    data["url"] = "my-abap-system"
    assert expect_error(data) == 'service key k.json: "url" is not an http(s) URL'


@pytest.mark.parametrize(
    "name",
    [
        "api-plan-secret.json",
        "api-plan-certificate.json",
        "api-plan-external-certificate.json",
        "xsuaa-secret.json",
        "xsuaa-x509.json",
        "uaa-nested.json",
    ],
)
def test_file_and_text_and_dict_agree(name: str) -> None:
    label = f"service key {sample(name)}"
    from_file = load_service_key_file(str(sample(name)))
    from_text = parse_service_key_text(sample(name).read_text(encoding="utf-8"), label)
    from_dict = parse_service_key(sample_data(name), label)
    assert from_file == from_text == from_dict
    assert isinstance(from_file, ServiceKey)


# --------------------------------------------------------------------------- tolerated variations


def test_unknown_fields_are_ignored() -> None:
    data = oauth_key(newfield={"nested": [1, 2]}, anothernumber=7)
    data["something-else"] = True
    data["oauth"]["createdate"] = "2030-01-01"
    key = parse_service_key(data, "k")
    assert key.client_id == "sb-client!b1"
    assert key.kind == "secret"


def test_unknown_fields_ignored_in_xsuaa_shape() -> None:
    data = sample_data("xsuaa-secret.json")
    data["zones"] = [{"id": 1}]
    data["verificationkey"] = 12345
    assert parse_service_key(data, "k").client_id == "sb-myapp!t12345"


@pytest.mark.parametrize(
    "name",
    ["api-plan-secret.json", "api-plan-certificate.json", "xsuaa-secret.json", "xsuaa-x509.json", "uaa-nested.json"],
)
def test_credentials_wrapper_accepted(name: str) -> None:
    plain = parse_service_key(sample_data(name), "k")
    wrapped = parse_service_key({"credentials": sample_data(name)}, "k")
    assert wrapped == plain


def test_credentials_wrapper_from_file(tmp_path: Path) -> None:
    path = write_key(tmp_path, {"credentials": sample_data("api-plan-secret.json"), "name": "my-key"})
    key = load_service_key_file(str(path))
    assert key.upstream_url == API_HOST
    assert key.token_url == f"{AUTH_HOST}/oauth/token"


@pytest.mark.parametrize(
    "url",
    [
        AUTH_HOST,
        AUTH_HOST + "/",
        AUTH_HOST + "/oauth/token",
        AUTH_HOST + "/oauth/token/",
        "  " + AUTH_HOST + "/  ",
    ],
)
def test_xsuaa_url_variants_give_one_token_endpoint(url: str) -> None:
    data = sample_data("xsuaa-secret.json")
    data["url"] = url
    assert parse_service_key(data, "k").token_url == f"{AUTH_HOST}/oauth/token"


@pytest.mark.parametrize("suffix", ["", "/", "/oauth/token", "/oauth/token/"])
def test_xsuaa_certurl_variants(suffix: str) -> None:
    data = sample_data("xsuaa-x509.json")
    data["certurl"] = CERT_AUTH_HOST + suffix
    assert parse_service_key(data, "k").token_url == f"{CERT_AUTH_HOST}/oauth/token"


@pytest.mark.parametrize("url", [API_HOST, API_HOST + "/", API_HOST + "//"])
def test_oauth_url_trailing_slash_stripped(url: str) -> None:
    assert parse_service_key(oauth_key(url=url), "k").upstream_url == API_HOST


def test_oauth_url_missing_gives_no_upstream() -> None:
    key = parse_service_key(oauth_key(url=None), "k")
    assert key.upstream_url is None


def test_oauth_tokenurl_kept_as_given() -> None:
    key = parse_service_key(oauth_key(tokenurl="https://auth.example.com/oauth/token"), "k")
    assert key.token_url == "https://auth.example.com/oauth/token"


def test_values_are_stripped() -> None:
    key = parse_service_key(oauth_key(clientid="  sb-client!b1\n", clientsecret=" FAKE \n"), "k")
    assert key.client_id == "sb-client!b1"
    assert key.client_secret == Secret("FAKE")


def test_certificate_wins_over_secret_in_oauth_shape() -> None:
    data = sample_data("api-plan-certificate.json")
    data["oauth"]["clientsecret"] = "FAKE-also-a-secret"
    key = parse_service_key(data, "k")
    assert key.kind == "certificate"
    assert key.client_secret is None


def test_bom_prefixed_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + sample("api-plan-secret.json").read_bytes())
    key = load_service_key_file(str(path))
    assert key.client_id.startswith("sb-0a1b2c3d")


def test_crlf_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "crlf.json"
    path.write_bytes(sample("xsuaa-secret.json").read_bytes().replace(b"\n", b"\r\n"))
    assert load_service_key_file(str(path)).client_id == "sb-myapp!t12345"


def test_home_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_key(tmp_path, sample_data("xsuaa-secret.json"), "home-key.json")
    key = load_service_key_file("~/home-key.json")
    assert key.client_id == "sb-myapp!t12345"
    assert key.source == "service key ~/home-key.json"


# --------------------------------------------------------------------------- errors


def test_not_json_mentions_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "oauth": {\n    "clientid": "x",\n  }\n}\n', encoding="utf-8")
    with pytest.raises(ServiceKeyError) as info:
        load_service_key_file(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"service key {path}: not valid JSON (line 4, column 3")
    assert "BTP cockpit" in message


def test_not_json_text_label() -> None:
    with pytest.raises(ServiceKeyError, match=r"^from env: not valid JSON \(line 1, column 1: "):
        parse_service_key_text("clientid=abc", "from env")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ServiceKeyError, match=r"not valid JSON \(line 1, column 1"):
        load_service_key_file(str(path))


@pytest.mark.parametrize(
    ("data", "type_name"),
    [([sample_data("api-plan-secret.json")], "list"), ("a string", "str"), (42, "int"), (None, "NoneType")],
)
def test_not_an_object(data: Any, type_name: str) -> None:
    assert expect_error(data) == f"service key k.json: expected a JSON object, got {type_name}"


def test_json_array_file(tmp_path: Path) -> None:
    path = write_key(tmp_path, [1, 2])
    with pytest.raises(ServiceKeyError) as info:
        load_service_key_file(str(path))
    assert str(info.value) == f"service key {path}: expected a JSON object, got list"


def test_missing_tokenurl_exact(tmp_path: Path) -> None:
    path = write_key(tmp_path, oauth_key(tokenurl=None))
    with pytest.raises(ServiceKeyError) as info:
        load_service_key_file(str(path))
    assert str(info.value) == f'service key {path}: missing "oauth.tokenurl"'


def test_empty_tokenurl_is_missing() -> None:
    assert expect_error(oauth_key(tokenurl="   ")) == 'service key k.json: missing "oauth.tokenurl"'


def test_missing_clientid() -> None:
    assert expect_error(oauth_key(clientid=None)) == 'service key k.json: missing "oauth.clientid"'


def test_missing_clientid_xsuaa_nested() -> None:
    data = sample_data("uaa-nested.json")
    del data["uaa"]["clientid"]
    assert expect_error(data) == 'service key k.json: missing "uaa.clientid"'


def test_secret_and_certificate_both_missing() -> None:
    message = expect_error(oauth_key(clientsecret=None))
    assert message == 'service key k.json: missing "oauth.clientsecret" (or "oauth.certificate" for a certificate key)'


def test_xsuaa_secret_missing() -> None:
    data = sample_data("xsuaa-secret.json")
    del data["clientsecret"]
    assert expect_error(data) == 'service key k.json: missing "clientsecret"'


def test_xsuaa_url_missing() -> None:
    data = sample_data("xsuaa-secret.json")
    del data["url"]
    assert expect_error(data) == 'service key k.json: missing "url"'


def test_neither_oauth_nor_clientid() -> None:
    message = expect_error({"foo": "bar", "url": "https://example.com"})
    assert message.startswith('service key k.json: missing "oauth" (or top-level "clientid")')


def test_oauth_not_an_object() -> None:
    message = expect_error({"oauth": "nope"})
    assert 'missing "oauth"' in message


@pytest.mark.parametrize(
    ("field", "value", "type_name"),
    [
        ("clientid", 12345, "int"),
        ("clientsecret", ["FAKE-list-secret"], "list"),
        ("tokenurl", {"href": "https://x"}, "dict"),
        ("url", True, "bool"),
        ("certificate", 1.5, "float"),
    ],
)
def test_non_string_field(field: str, value: Any, type_name: str) -> None:
    message = expect_error(oauth_key(**{field: value}))
    assert message == f'service key k.json: "oauth.{field}" must be a string, got {type_name}'
    assert "FAKE-list-secret" not in message


def test_non_string_field_xsuaa() -> None:
    data = sample_data("xsuaa-secret.json")
    data["clientsecret"] = 987654321
    message = expect_error(data)
    assert message == 'service key k.json: "clientsecret" must be a string, got int'
    assert "987654321" not in message


@pytest.mark.parametrize(
    "url",
    ["not-a-url", "ftp://auth.example.com/oauth/token", "https://", "auth.example.com/oauth/token", "file:///etc"],
)
def test_tokenurl_not_a_url(url: str) -> None:
    assert expect_error(oauth_key(tokenurl=url)) == 'service key k.json: "oauth.tokenurl" is not an http(s) URL'


def test_oauth_url_not_a_url() -> None:
    assert expect_error(oauth_key(url="mytenant")) == 'service key k.json: "oauth.url" is not an http(s) URL'


def test_xsuaa_url_not_a_url() -> None:
    data = sample_data("xsuaa-secret.json")
    data["url"] = "authentication.eu10"
    assert expect_error(data) == 'service key k.json: "url" is not an http(s) URL'


def test_xsuaa_certurl_not_a_url() -> None:
    data = sample_data("xsuaa-x509.json")
    data["certurl"] = "cert-host-only"
    assert expect_error(data) == 'service key k.json: "certurl" is not an http(s) URL'


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ServiceKeyError) as info:
        load_service_key_file(str(path))
    assert str(info.value) == f"service key {path}: file not found"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ServiceKeyError) as info:
        load_service_key_file(str(tmp_path))
    message = str(info.value)
    assert message == f"service key {tmp_path}: is a directory, expected the JSON file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"oauth": {"clientid": "\xe9"}}')
    with pytest.raises(ServiceKeyError) as info:
        load_service_key_file(str(path))
    assert str(info.value) == f"service key {path}: cannot read it (UnicodeDecodeError)"


def test_service_key_error_is_value_error() -> None:
    assert issubclass(ServiceKeyError, ValueError)


# --------------------------------------------------------------------------- secrets stay hidden


@pytest.mark.parametrize("name", ["api-plan-secret.json", "xsuaa-secret.json", "uaa-nested.json"])
def test_secret_not_in_repr(name: str) -> None:
    key = load_service_key_file(str(sample(name)))
    assert key.client_secret is not None
    secret = key.client_secret.reveal()
    assert secret not in repr(key)
    assert secret not in str(key)
    assert secret not in f"{key}"
    assert key.client_secret.fingerprint in repr(key)


@pytest.mark.parametrize("name", ["api-plan-certificate.json", "xsuaa-x509.json"])
def test_private_key_not_in_repr(name: str) -> None:
    key = load_service_key_file(str(sample(name)))
    assert key.key is not None and key.key.text is not None
    assert "PRIVATE KEY" not in repr(key)
    assert key.key.text not in repr(key)


@pytest.mark.parametrize(
    "breakage",
    [
        {"tokenurl": None},
        {"clientid": None},
        {"tokenurl": "nope"},
        {"url": "nope"},
        {"clientid": 5},
        {"clientsecret": 5},
        {"clientsecret": None},
    ],
)
def test_secret_not_in_error(breakage: dict[str, Any]) -> None:
    secret = "FAKE-very-secret-value-xyz"
    data = oauth_key(clientsecret=secret)
    data["oauth"].update(breakage)
    data["oauth"] = {k: v for k, v in data["oauth"].items() if v is not None}
    message = expect_error(data)
    assert secret not in message


def test_secret_not_in_json_error() -> None:
    secret = "FAKE-very-secret-value-xyz"
    text = '{"oauth": {"clientsecret": "' + secret + '" "clientid": "x"}}'
    with pytest.raises(ServiceKeyError) as info:
        parse_service_key_text(text, "k")
    assert secret not in str(info.value)
    assert "\n" not in str(info.value)
