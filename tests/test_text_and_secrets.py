"""Text made safe to store and to log; secrets masked; client key ids keyed (no I/O but the
secret file)."""

import hashlib
import hmac
import json
import os
import threading

import pytest

from proxy.redact import (Redactor, client_key_id, installation_secret, mask,
                          request_credentials)
from proxy.text import cap, escape_line, loggable, storable


# --- storable and loggable -------------------------------------------------------------------------

@pytest.mark.parametrize("raw, stored", [
    ("plain", "plain"),
    ("héllo 🌍", "héllo 🌍"),
    (json.loads('"x\\ud800y"'), "x\ufffdy"),  # a lone surrogate json.loads accepts
    (b'"\xed\xa0\x80"'.decode("utf-8", "surrogatepass"), '"\ufffd"'),
    ("a\x00b", "a\ufffdb"),
    ("line\nbreak\ttab", "line\nbreak\ttab"),  # storable: kept as they are
])
def test_storable_text_always_encodes(raw, stored):
    assert storable(raw, 100) == stored
    storable(raw, 100).encode("utf-8")  # never raises


def test_long_values_are_cut_with_a_marker_that_says_how_much():
    assert cap("x" * 10, 4) == "xxxx...[6 more characters]"
    huge = "m" * 30_000_000
    assert storable(huge, 256) == "m" * 256 + f"...[{30_000_000 - 256} more characters]"


@pytest.mark.parametrize("raw, logged", [
    ("claude\n2026-11-30 INFO forged line", "claude\\n2026-11-30 INFO forged line"),
    ("a\rb", "a\\rb"),
    ("x\u2028y", "x\\u2028y"),
    ("\x1b[31mred", "\\x1b[31mred"),
    (json.loads('"\\udfff"'), "\\udfff"),
    ("héllo", "héllo"),
])
def test_log_fields_cannot_start_a_line(raw, logged):
    assert loggable(raw) == logged
    assert "\n" not in escape_line(f"model={raw} cause={raw}")


# --- masking ---------------------------------------------------------------------------------------

KEY = "sk-ant-api03-SECRETSECRETSECRET"


def test_masks_keep_length_and_are_recognisable():
    for n in (8, 9, 10, 31, 100):
        assert len(mask(n)) == n
    assert mask(31).startswith("[REDACTED") and mask(31).endswith("]")


def test_redactor_masks_text_bytes_and_headers_and_ignores_short_values():
    r = Redactor([KEY, "short", None, ""])
    body = f'{{"error":{{"message":"invalid x-api-key {KEY}"}}}}'
    assert KEY not in r.text(body) and len(r.text(body)) == len(body)
    assert KEY.encode() not in r.data(body.encode())
    assert r.headers([("x-echo", f"Bearer {KEY}")]) == [("x-echo", "Bearer " + mask(len(KEY)))]
    assert r.text("a short word") == "a short word"  # under MIN_SECRET_LENGTH: not a secret
    assert not Redactor([None, "tiny"])


def test_a_client_key_that_is_a_prefix_of_the_provider_key_cannot_unmask_the_rest():
    """Masking must go longest first in bytes as in text, whatever the set order of the
    secrets (which varies with their hashes: many pairs, so an unlucky order shows)."""
    for n in range(40):
        provider = f"sk-ant-api03-{n:04d}-PROVIDERSECRETPROVIDERSECRET"
        client = provider[:13 + n % 10]  # "sk-ant-api03-..." a prefix, chosen by the client
        redactor = Redactor([provider, client])
        masked = redactor.data(f"echo: {provider}".encode())
        assert masked == f"echo: {mask(len(provider))}".encode(), (n, masked)


def test_stream_redactor_catches_a_key_split_between_reads():
    r = Redactor([KEY]).stream()
    body = f"before {KEY} after".encode()
    for cut in range(1, len(body)):
        stream = Redactor([KEY]).stream()
        out = stream.feed(body[:cut]) + stream.feed(body[cut:]) + stream.flush()
        assert out == f"before {mask(len(KEY))} after".encode(), cut
    assert r.feed(b"") == b""


def test_request_credentials_from_every_header_a_client_uses():
    headers = {"x-api-key": "k1-aaaaaaaa", "authorization": "Bearer  tok-bbbbbbbb ",
               "api-key": "azure-cccccccc", "x-goog-api-key": "g-dddddddd"}
    assert sorted(request_credentials(headers)) == sorted(
        ["k1-aaaaaaaa", "tok-bbbbbbbb", "azure-cccccccc", "g-dddddddd"])
    assert request_credentials({}) == []


# --- key ids -------------------------------------------------------------------------------------

def test_key_ids_are_keyed_hashes_not_a_bare_sha256(tmp_path):
    secret = installation_secret(str(tmp_path / "secret"))
    key_id = client_key_id("sk-client-1", secret)
    assert key_id == "key_" + hmac.new(secret, b"sk-client-1", hashlib.sha256).hexdigest()[:20]
    assert key_id[4:20] != hashlib.sha256(b"sk-client-1").hexdigest()[:16]
    assert client_key_id("sk-client-1", secret) == key_id  # stable
    assert client_key_id("sk-client-1", b"another installation's secret!!!!") != key_id
    assert client_key_id(None, secret) is None


def test_the_installation_secret_is_created_once_private_and_shared(tmp_path):
    path = str(tmp_path / "deep" / "secret")
    found = []
    threads = [threading.Thread(target=lambda: found.append(installation_secret(path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1 and len(found[0]) >= 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert installation_secret(path) == found[0]
    assert [n for n in os.listdir(tmp_path / "deep")] == ["secret"]  # no temporary left
