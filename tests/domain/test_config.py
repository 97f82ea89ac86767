"""Configuration: defaults, environment, flags (flags win)."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightsmith_server.config import parse_config


def test_defaults() -> None:
    config = parse_config([], environ={})
    assert config.address == "127.0.0.1:50051"
    assert config.store == Path("weightsmith-data")
    assert config.device == "auto"
    assert config.max_message_bytes == 64 * 1024 * 1024


def test_environment_then_flags_win() -> None:
    environ = {
        "WEIGHTSMITH_ADDRESS": "127.0.0.1:7000",
        "WEIGHTSMITH_DEVICE": "cpu",
        "WEIGHTSMITH_MAX_MESSAGE_MB": "16",
    }
    config = parse_config(["--address", "127.0.0.1:7001"], environ=environ)
    assert config.address == "127.0.0.1:7001"
    assert config.device == "cpu"
    assert config.max_message_mb == 16


@pytest.mark.parametrize("argv", [["--chunk-kb", "8"], ["--max-message-mb", "1"], ["--log-format", "xml"]])
def test_invalid_values_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(argv, environ={})
