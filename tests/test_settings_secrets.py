"""Secrets in the settings never reach a repr, a log line, a default JSON dump or a
validation error, yet stay usable where they are needed (the gateway's auth and its Redis
connection are covered end to end by tests/test_security.py and tests/test_redis_auth_tls.py)."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr, ValidationError

from app.cli import _serve_settings
from workers.settings import Settings, reveal

REDIS_PW = "redis-pw-4f1c9a"
KEY_A = "api-key-a-77d2e0"
KEY_B = "api-key-b-0b3e51"
OPENAI = "sk-openai-9e8d7c"
SECRETS = (REDIS_PW, KEY_A, KEY_B, OPENAI)


def _settings() -> Settings:
    return Settings(
        redis_url=f"redis://alto:{REDIS_PW}@127.0.0.1:6379/0",
        api_keys=[KEY_A, KEY_B],
        openai_api_key=OPENAI,
    )


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_repr_str_and_default_dump_hide_every_secret() -> None:
    s = _settings()
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump()), f"{s}", f"{s!r}"):
        assert _leaks(text) == [], text


def test_logging_the_settings_hides_every_secret(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="alto.test"):
        logging.getLogger("alto.test").info("settings: %r / %s", _settings(), _settings())
    assert "settings:" in caplog.text and "api_keys" in caplog.text
    assert _leaks(caplog.text) == []


def test_validation_errors_do_not_echo_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed JSON key list (a typo in ALTO_API_KEYS) must not print the keys."""
    monkeypatch.setenv("ALTO_API_KEYS", f'["{KEY_A}", ')
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "api_keys" in str(info.value)
    assert _leaks(str(info.value)) == [] and _leaks(repr(info.value)) == []


def test_secrets_stay_usable() -> None:
    s = _settings()
    assert reveal(s.redis_url) == f"redis://alto:{REDIS_PW}@127.0.0.1:6379/0"
    assert [reveal(k) for k in s.api_keys] == [KEY_A, KEY_B]
    assert reveal(s.openai_api_key) == OPENAI
    assert reveal(None) is None and reveal("plain") == "plain"


def test_env_secrets_are_wrapped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALTO_REDIS_URL", f"redis://:{REDIS_PW}@h:1/0")
    monkeypatch.setenv("ALTO_API_KEYS", f"{KEY_A},{KEY_B}")
    monkeypatch.setenv("ALTO_OPENAI_API_KEY", OPENAI)
    s = Settings()
    assert isinstance(s.redis_url, SecretStr) and isinstance(s.openai_api_key, SecretStr)
    assert all(isinstance(k, SecretStr) for k in s.api_keys)
    assert _leaks(repr(s)) == [] and _leaks(s.model_dump_json()) == []


def test_cli_flag_redis_url_is_secret_as_well(monkeypatch: pytest.MonkeyPatch) -> None:
    """`alto serve --redis-url` goes through model_copy, which does not validate."""
    monkeypatch.delenv("ALTO_REDIS_URL", raising=False)
    s, _ = _serve_settings(None, f"redis://:{REDIS_PW}@h:1/0", None, None, None, None)
    assert isinstance(s.redis_url, SecretStr)
    assert _leaks(repr(s)) == []
    assert reveal(s.redis_url) == f"redis://:{REDIS_PW}@h:1/0"
