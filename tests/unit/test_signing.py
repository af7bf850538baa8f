"""Standard Webhooks signing, verified with the reference ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import hmac

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from herald.channels import signing
from herald.errors import ValidationError
from tests.strategies import json_bodies, msg_ids, recent_timestamps, secrets


def verify(secret: str, body: bytes, headers: dict[str, str]) -> None:
    Webhook(secret).verify(body, headers, json_parse=False)


def test_known_answer_from_the_spec() -> None:
    signature = signing.sign(
        secrets=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        timestamp=1614265330,
        body=b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@given(secret=secrets, msg_id=msg_ids, timestamp=recent_timestamps, body=json_bodies)
def test_every_signature_verifies(secret: str, msg_id: str, timestamp: int, body: bytes) -> None:
    headers = signing.headers(secrets=[secret], msg_id=msg_id, timestamp=timestamp, body=body)

    assert headers["webhook-id"] == msg_id
    assert headers["webhook-timestamp"] == str(timestamp)
    verify(secret, body, headers)


@given(old=secrets, new=secrets, msg_id=msg_ids, timestamp=recent_timestamps, body=json_bodies)
def test_rotation_signs_with_every_secret(old: str, new: str, msg_id: str, timestamp: int, body: bytes) -> None:
    headers = signing.headers(secrets=[old, new], msg_id=msg_id, timestamp=timestamp, body=body)

    assert len(headers["webhook-signature"].split(" ")) == 2
    verify(old, body, headers)
    verify(new, body, headers)


@given(
    secret=secrets,
    msg_id=msg_ids,
    timestamp=recent_timestamps,
    body=json_bodies,
    tamper=st.sampled_from(["body", "id", "timestamp"]),
)
def test_tampering_breaks_the_signature(secret: str, msg_id: str, timestamp: int, body: bytes, tamper: str) -> None:
    headers = signing.headers(secrets=[secret], msg_id=msg_id, timestamp=timestamp, body=body)
    if tamper == "body":
        body += b" "
    elif tamper == "id":
        headers["webhook-id"] = msg_id + "x"
    else:
        headers["webhook-timestamp"] = str(timestamp + 1)

    with pytest.raises(WebhookVerificationError):
        verify(secret, body, headers)


@given(secret=secrets, other=secrets, msg_id=msg_ids, timestamp=recent_timestamps, body=json_bodies)
def test_another_secret_does_not_verify(secret: str, other: str, msg_id: str, timestamp: int, body: bytes) -> None:
    assume(other != secret)
    headers = signing.headers(secrets=[secret], msg_id=msg_id, timestamp=timestamp, body=body)

    with pytest.raises(WebhookVerificationError):
        verify(other, body, headers)


keys = st.binary(min_size=24, max_size=64)


def as_secret(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode("ascii")


def reference_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.digest(key, f"{msg_id}.{timestamp}.".encode() + body, "sha256")
    return "v1," + base64.b64encode(digest).decode("ascii")


@given(key=keys, msg_id=msg_ids, timestamp=st.integers(min_value=0, max_value=2**40), body=st.binary())
def test_signature_is_the_hmac_of_the_spec(key: bytes, msg_id: str, timestamp: int, body: bytes) -> None:
    signature = signing.sign(secrets=[as_secret(key)], msg_id=msg_id, timestamp=timestamp, body=body)

    assert signature == reference_signature(key, msg_id, timestamp, body)


@given(rotation=st.lists(keys, min_size=1, max_size=4), msg_id=msg_ids, timestamp=recent_timestamps, body=json_bodies)
def test_rotation_joins_each_hmac_in_order(rotation: list[bytes], msg_id: str, timestamp: int, body: bytes) -> None:
    secrets_ = [as_secret(key) for key in rotation]
    signature = signing.sign(secrets=secrets_, msg_id=msg_id, timestamp=timestamp, body=body)

    assert signature == " ".join(reference_signature(key, msg_id, timestamp, body) for key in rotation)
    # Signing again (cached states) gives the same value: the cached states are only ever copied.
    assert signing.sign(secrets=secrets_, msg_id=msg_id, timestamp=timestamp, body=body) == signature


def test_body_bytes_are_signed_as_sent() -> None:
    secret = signing.generate_secret()
    one = signing.sign(secrets=[secret], msg_id="m", timestamp=1, body=b'{"a":1}')
    spaced = signing.sign(secrets=[secret], msg_id="m", timestamp=1, body=b'{"a": 1}')

    assert one != spaced


def test_generated_secrets_are_random_and_valid() -> None:
    generated = {signing.generate_secret() for _ in range(20)}

    assert len(generated) == 20
    for secret in generated:
        assert secret.startswith("whsec_")
        assert 24 <= len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) <= 32
        signing.sign(secrets=[secret], msg_id="m", timestamp=1, body=b"{}")


@pytest.mark.parametrize("n_bytes", [23, 33])
def test_generate_secret_refuses_other_sizes(n_bytes: int) -> None:
    with pytest.raises(ValueError, match="n_bytes"):
        signing.generate_secret(n_bytes)


_KEY_24 = base64.b64encode(b"k" * 24).decode()


@pytest.mark.parametrize(
    "secret",
    [
        "",
        _KEY_24,  # no prefix
        "WHSEC_" + _KEY_24,
        "whsec_",
        "whsec_not base64!",
        "whsec_" + _KEY_24.rstrip("=") + "A",  # bad padding
        "whsec_" + base64.b64encode(b"k" * 16).decode(),  # too short
        "whsec_" + base64.b64encode(b"k" * 65).decode(),  # too long
        "whsec_" + base64.urlsafe_b64encode(b"\xfb" * 24).decode(),  # URL-safe alphabet is not the spec's
    ],
)
def test_bad_secrets_are_refused_without_echoing_them(secret: str) -> None:
    with pytest.raises(ValidationError) as info:
        signing.headers(secrets=[secret], msg_id="m", timestamp=1, body=b"{}")

    assert info.value.field == "secret"
    assert info.value.message.startswith("secret: ")
    if secret.removeprefix("whsec_"):
        assert secret.removeprefix("whsec_") not in info.value.message


def test_one_bad_secret_in_a_rotation_is_refused() -> None:
    with pytest.raises(ValidationError):
        signing.sign(secrets=[signing.generate_secret(), "whsec_"], msg_id="m", timestamp=1, body=b"{}")


def test_no_secrets_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        signing.sign(secrets=[], msg_id="m", timestamp=1, body=b"{}")

    assert info.value.field == "secrets"
