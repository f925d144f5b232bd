"""Agent config: embedded defaults, TOML, env overrides, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_config, parse_listen
from edge_agent.errors import ConfigError


def test_defaults_without_config() -> None:
    cfg = load_config(env={})
    assert cfg.listen == "127.0.0.1:8080"
    assert cfg.listen_address() == ("127.0.0.1", 8080)
    assert cfg.models_dir is not None and (cfg.models_dir / "digits").is_dir()


def test_toml_then_env_then_overrides(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(
        'listen = "0.0.0.0:9000"\ndata_dir = "/tmp/x"\n[runtime]\nnum_threads = 2\n'
        '[[runtime.delegates]]\nlibrary = "libedgetpu.so.1"\noptions = { device = "usb" }\n'
    )
    cfg = load_config(conf, env={"EDGEFLEET_RUNTIME__POOL_SIZE": "4", "EDGEFLEET_LISTEN": "127.0.0.1:9001"})
    assert cfg.listen == "127.0.0.1:9001"
    assert cfg.data_dir == Path("/tmp/x")
    opts = cfg.runtime.options()
    assert (opts.num_threads, opts.pool_size) == (2, 4)
    assert opts.delegates[0].library == "libedgetpu.so.1" and opts.delegates[0].options == {"device": "usb"}
    cfg = load_config(conf, env={}, overrides={"listen": "unix:/tmp/a.sock"})
    assert cfg.listen_address() == "/tmp/a.sock"


@pytest.mark.parametrize(
    "text, message",
    [
        ("listen = 'nope'", "HOST:PORT"),
        ("bogus = 1", "unknown config key"),
        ("[runtime]\nnum_threads = 'two'", "runtime.num_threads"),
        ("[runtime]\npool_size = 0", "pool_size"),
        ("keep_versions = 1", "keep_versions"),
        ("listen = ", "not valid TOML"),
        ("runtime = 3", "must be a table"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(conf, env={})


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/agent.toml", env={})


def test_bad_env_value() -> None:
    with pytest.raises(ConfigError, match="max_body_bytes"):
        load_config(env={"EDGEFLEET_MAX_BODY_BYTES": "lots"})


@pytest.mark.parametrize("value", ["localhost", ":80", "host:99999", "unix:"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(value)


def test_parse_listen_ipv6() -> None:
    assert parse_listen("[::1]:8080") == ("::1", 8080)
