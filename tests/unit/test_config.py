from __future__ import annotations

from pathlib import Path

import pytest

from gristmill.common.config import ConfigError, load_config
from gristmill.store.config import StoreConfig


def test_yaml_env_and_flags_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data_dir: /srv/a\nport: 1000\nstore:\n  read_message_bytes: 1048576\n")
    env = {"GRISTMILL_PORT": "2000", "GRISTMILL_STORE__READ_CHUNK_BYTES": "131072",
           "GRISTMILL_SERVICES": "store, decode", "GRISTMILL_API_KEY": "client-side, ignored"}
    cfg = load_config(cfg_file, environ=env, overrides={"port": 3000})
    assert cfg.data_dir == Path("/srv/a")
    assert cfg.port == 3000
    assert StoreConfig.of(cfg).read_message_bytes == 1048576
    assert StoreConfig.of(cfg).read_chunk_bytes == 131072
    assert cfg.services == ("store", "decode")
    assert cfg.keys_file == Path("/srv/a/keys.sqlite")


def test_backend_keys_without_a_kind_are_the_filesystem_backends(tmp_path: Path) -> None:
    base = {"GRISTMILL_DATA_DIR": "/x"}
    assert StoreConfig.of(load_config(environ=base)).backend.model_dump() == {
        "kind": "fs", "inline_max_bytes": 16384}
    one_key = {**base, "GRISTMILL_STORE__BACKEND__INLINE_MAX_BYTES": "0"}
    backend = StoreConfig.of(load_config(environ=one_key)).backend
    assert backend.kind == "fs" and backend.model_dump()["inline_max_bytes"] == 0
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data_dir: /x\nstore:\n  backend: fs\n")  # the bare name of old configs
    assert StoreConfig.of(load_config(cfg_file, environ={})).backend.kind == "fs"
    for bad in ("-1", str(2 << 20)):
        with pytest.raises(ConfigError, match="inline_max_bytes"):
            load_config(environ={**base, "GRISTMILL_STORE__BACKEND__INLINE_MAX_BYTES": bad})
    with pytest.raises(ConfigError, match="inline_max_bytes"):  # not a Ceph key
        load_config(environ={**base, "GRISTMILL_STORE__BACKEND__KIND": "ceph",
                             "GRISTMILL_STORE__BACKEND__CONF": "/c",
                             "GRISTMILL_STORE__BACKEND__INLINE_MAX_BYTES": "0"})


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


def test_service_sections_come_from_installed_packages() -> None:
    from gristmill.annotate.config import AnnotateConfig
    from gristmill.common.config import ServerConfig, server_config_model
    from gristmill.decode.config import DecodeConfig
    from gristmill.ingest.config import IngestConfig

    model = server_config_model()
    # the kit declares none of them; each package adds its own
    assert not {"store", "decode", "ingest", "annotate"} & set(ServerConfig.model_fields)
    assert {"store", "decode", "ingest", "annotate"} <= set(model.model_fields)
    cfg = load_config(environ={"GRISTMILL_DATA_DIR": "/tmp/x", "GRISTMILL_DECODE__WORKERS": "3"})
    assert DecodeConfig.of(cfg).workers == 3
    assert isinstance(IngestConfig.of(cfg), IngestConfig)
    assert isinstance(AnnotateConfig.of(cfg), AnnotateConfig)
    with pytest.raises(ConfigError, match="unknown config key 'decode.wrokers'"):
        load_config(environ={"GRISTMILL_DATA_DIR": "/tmp/x", "GRISTMILL_DECODE__WROKERS": "3"})
    # a section's own rule against the kit's keys
    with pytest.raises(ConfigError, match="read_message_bytes"):
        load_config(environ={"GRISTMILL_DATA_DIR": "/tmp/x",
                             "GRISTMILL_MAX_MESSAGE_BYTES": str(1 << 20),
                             "GRISTMILL_STORE__READ_MESSAGE_BYTES": str(1 << 20)})
    bare = ServerConfig(data_dir=Path("/tmp/x"))  # a kit config without service sections
    with pytest.raises(ConfigError, match="no 'store' section"):
        StoreConfig.of(bare)


def test_start_order_follows_after() -> None:
    import grpc

    from gristmill.common.service import ServiceContext, ServiceSpec, _start_order

    def build(ctx: ServiceContext, server: grpc.Server) -> None:
        return None

    def spec(name: str, *after: str) -> ServiceSpec:
        return ServiceSpec(name, f"x.{name}", build, {}, after=after)

    order = _start_order({s.name: s for s in (spec("ingest", "store", "decode"),
                                              spec("decode", "store"), spec("store"),
                                              spec("zeta"))})
    assert [s.name for s in order] == ["store", "zeta", "decode", "ingest"]
    # a dependency that is not selected is simply not waited for
    assert [s.name for s in _start_order({"ingest": spec("ingest", "store")})] == ["ingest"]
    with pytest.raises(ConfigError, match="cycle"):
        _start_order({"a": spec("a", "b"), "b": spec("b", "a")})


def test_variables_of_services_not_installed_here_are_ignored() -> None:
    """One environment shared by several images: another service's variables are not errors
    here, while a misspelt key of an installed section or of the kit still is."""
    env = {"GRISTMILL_DATA_DIR": "/tmp/x", "GRISTMILL_RENDERER__THREADS": "4"}
    cfg = load_config(environ=env)
    assert not hasattr(cfg, "renderer")
    with pytest.raises(ConfigError, match="unknown config key 'limits.max_strems'"):
        load_config(environ={**env, "GRISTMILL_LIMITS__MAX_STREMS": "3"})
    with pytest.raises(ConfigError, match="unknown config key 'renderer'"):
        load_config(environ={}, overrides={"data_dir": "/tmp/x", "renderer": {"threads": 4}})
