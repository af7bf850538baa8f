"""Settings: environment names, nested groups, and errors that name the key and the value."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from herald.config import Settings, explain


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERALD_DATABASE__URL", "postgresql://u@db/herald")
    monkeypatch.setenv("HERALD_RETRY__MAX_ATTEMPTS", "3")
    monkeypatch.setenv("HERALD_WEBHOOK__ALLOW_NETWORKS", "127.0.0.0/8, ::1/128")
    settings = Settings()
    assert settings.database_url == "postgresql://u@db/herald"
    assert settings.retry.max_attempts == 3
    assert settings.webhook.allow_networks == ["127.0.0.0/8", "::1/128"]


def test_defaults_are_embedded(tmp_path: object) -> None:
    settings = Settings()
    assert settings.database_url.startswith("sqlite:///") and settings.database_url.endswith("herald-data/herald.db")
    assert settings.broker_url.startswith("redis+socket://") and settings.broker_url.endswith("redis.sock")


def test_unsupported_database_names_key_and_value() -> None:
    with pytest.raises(ValidationError, match=r"HERALD_DATABASE__URL: unsupported scheme 'mysql'"):
        Settings(database={"url": "mysql://x/y"})


def test_bad_network_names_key_and_value() -> None:
    with pytest.raises(ValidationError, match=r"HERALD_WEBHOOK__ALLOW_NETWORKS: not a network, got 'nope'"):
        Settings(webhook={"allow_networks": ["nope"]})


def test_lease_must_outlast_the_send_timeout() -> None:
    with pytest.raises(ValidationError, match=r"HERALD_DISPATCH__LEASE_S: must exceed"):
        Settings(dispatch={"lease_s": 5}, webhook={"total_timeout_s": 10})


@pytest.mark.parametrize(
    ("dispatch", "pattern"),
    [
        ({"visibility_timeout_s": 30}, r"HERALD_DISPATCH__VISIBILITY_TIMEOUT_S: must exceed .* \(125\), got 30$"),
        ({"visibility_timeout_s": 125}, r"HERALD_DISPATCH__VISIBILITY_TIMEOUT_S: must exceed .* \(125\), got 125$"),
        (
            {"lease_s": 60, "reconcile_every_s": 10, "visibility_timeout_s": 69.5},
            r"HERALD_DISPATCH__VISIBILITY_TIMEOUT_S: must exceed .* \(70\), got 69.5$",
        ),
        ({"lease_s": 20, "reconcile_every_s": 80}, r"HERALD_DISPATCH__RECONCILE_EVERY_S: must be under .* got 80$"),
    ],
)
def test_visibility_timeout_must_outlast_lease_and_reconcile(dispatch: dict[str, float], pattern: str) -> None:
    """Redis redelivering before the reconciler could act would duplicate every slow batch."""
    with pytest.raises(ValidationError) as caught:
        Settings(dispatch=dispatch)
    [error] = caught.value.errors()
    assert re.search(pattern, error["msg"]), error["msg"]


@pytest.mark.parametrize(
    "env",
    [
        {"HERALD_DISPATCH__VISIBILITY_TIMEOUT_S": "30"},
        {"HERALD_DISPATCH__LEASE_S": "300", "HERALD_DISPATCH__VISIBILITY_TIMEOUT_S": "250"},
    ],
)
def test_visibility_timeout_from_the_environment_is_checked(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=r"HERALD_DISPATCH__VISIBILITY_TIMEOUT_S: must exceed"):
        Settings()


@pytest.mark.parametrize(
    ("dispatch", "effective"),
    [
        ({}, 300),  # derived: 2 x lease + 60
        ({"visibility_timeout_s": 125.5}, 125.5),
        ({"lease_s": 20, "reconcile_every_s": 1, "visibility_timeout_s": 22}, 22),
        ({"lease_s": 20, "reconcile_every_s": 79}, 100),
    ],
)
def test_consistent_visibility_timeouts_are_accepted(dispatch: dict[str, float], effective: float) -> None:
    settings = Settings(dispatch=dispatch, webhook={"total_timeout_s": 5})
    cfg = settings.dispatch
    assert (cfg.visibility_timeout_s or 2 * cfg.lease_s + 60) == effective
    assert effective > cfg.lease_s + cfg.reconcile_every_s


def test_every_setting_is_documented_in_the_readme() -> None:
    from pathlib import Path

    from pydantic import BaseModel

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    settings = Settings()
    names: list[str] = []
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            names += [f"HERALD_{name.upper()}__{sub.upper()}" for sub in type(value).model_fields]
        else:
            names.append(f"HERALD_{name.upper()}")
    missing = [n for n in names if f"`{n}`" not in readme]
    assert not missing, f"settings missing from the README: {missing}"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HERALD_INGEST__YIELD_CHUNK_SIZE": "0"}, "HERALD_INGEST__YIELD_CHUNK_SIZE: Input should be greater than"),
        ({"HERALD_INGEST__YIELD_PAUSE_S": "-1"}, "HERALD_INGEST__YIELD_PAUSE_S: Input should be greater than"),
        ({"HERALD_WORKER__CONCURRENCY": "s3cr3t-two"}, "HERALD_WORKER__CONCURRENCY: Input should be a valid integer"),
        ({"HERALD_DISPATCH__LEASE_S": "5"}, "HERALD_DISPATCH__LEASE_S: must exceed HERALD_WEBHOOK__TOTAL_TIMEOUT_S"),
        ({"HERALD_WEBHOOK__CONNECT_TIMEOUT_S": "-5"}, "HERALD_WEBHOOK__CONNECT_TIMEOUT_S: Input should be greater"),
        ({"HERALD_INGEST__TEMPLATE": "de-x-spring"}, "HERALD_INGEST__TEMPLATE: must be a locale such as 'pt-BR'"),
    ],
)
def test_a_bad_setting_is_explained_by_its_variable_never_its_value(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    message = explain(caught.value)
    assert message.startswith(expected), message
    assert "s3cr3t" not in message  # values are never echoed: some settings are secrets
