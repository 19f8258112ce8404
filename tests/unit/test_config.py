from __future__ import annotations

from pathlib import Path

import pytest

from gristmill.common.config import ConfigError, load_config


def test_yaml_env_and_flags_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data_dir: /srv/a\nport: 1000\nstore:\n  read_message_bytes: 1048576\n")
    env = {"GRISTMILL_PORT": "2000", "GRISTMILL_STORE__READ_CHUNK_BYTES": "131072",
           "GRISTMILL_SERVICES": "store, decode", "GRISTMILL_API_KEY": "client-side, ignored"}
    cfg = load_config(cfg_file, environ=env, overrides={"port": 3000})
    assert cfg.data_dir == Path("/srv/a")
    assert cfg.port == 3000
    assert cfg.store.read_message_bytes == 1048576
    assert cfg.store.read_chunk_bytes == 131072
    assert cfg.services == ("store", "decode")
    assert cfg.keys_file == Path("/srv/a/keys.sqlite")


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data_dir: /x\nprot: 1\nstore:\n  backnd: fs\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, environ={})
    assert "'prot'" in str(info.value) and "'store.backnd'" in str(info.value)
    with pytest.raises(ConfigError, match="GRISTMILL_TLS__CERTFILE"):
        load_config(environ={"GRISTMILL_DATA_DIR": "/x", "GRISTMILL_TLS__CERTFILE": "a"})


def test_missing_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="missing config key 'data_dir'.*GRISTMILL_DATA_DIR"):
        load_config(environ={})
    with pytest.raises(ConfigError, match="'tls.key_file'"):
        load_config(environ={"GRISTMILL_DATA_DIR": "/x", "GRISTMILL_TLS__CERT_FILE": "a"})


def test_bad_values_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'port'"):
        load_config(environ={"GRISTMILL_DATA_DIR": "/x", "GRISTMILL_PORT": "seventy"})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, environ={})


def test_metrics_can_be_disabled() -> None:
    cfg = load_config(environ={"GRISTMILL_DATA_DIR": "/x", "GRISTMILL_METRICS_PORT": "none"})
    assert cfg.metrics_port is None
