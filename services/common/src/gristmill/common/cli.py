"""Server commands of the ``gristmill`` CLI: ``serve``, ``keys`` (and the store's ``store``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from gristmill.common.auth import KeyStore, Role
from gristmill.common.config import ConfigError, load_config
from gristmill.common.logs import setup_logging

__all__ = ["register"]


def _data_dir_problem(data_dir: Path) -> str | None:
    """Why ``data_dir`` cannot be a data directory (created if missing), if it cannot."""
    for d in (data_dir, *data_dir.parents):
        if d.exists():
            if not d.is_dir():
                return (f"the data directory {data_dir} " + ("is a file" if d == data_dir else
                        f"is under {d}, which is a file") + ": give --data a directory (it "
                        "is created if missing)")
            return None
    return None


def _serve(args: argparse.Namespace) -> int:
    from gristmill.common.server import serve

    overrides: dict[str, Any] = {
        "data_dir": args.data, "host": args.host, "port": args.port,
        "metrics_port": args.metrics_port, "log_level": args.log_level,
    }
    if args.no_metrics:
        overrides["metrics_port"] = None
    if args.services:
        overrides["services"] = [s.strip() for s in args.services.split(",") if s.strip()]
    if args.no_auth:
        overrides["auth"] = {"enabled": False}
    ceph = {"conf": args.ceph_conf, "pool": args.ceph_pool, "keyring": args.ceph_keyring,
            "timeout_seconds": args.ceph_timeout, "catalog": args.ceph_catalog}
    if args.storage == "fs" and any(v is not None for v in ceph.values()):
        print("error: --ceph-* flags need --storage ceph", file=sys.stderr)
        return 2
    if args.storage is not None:
        overrides["store"] = {"backend": {"kind": args.storage,
                                          **{k: v for k, v in ceph.items() if v is not None}}}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (problem := _data_dir_problem(config.data_dir)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.no_metrics:
        config = config.model_copy(update={"metrics_port": None})
    setup_logging(config.log_level)
    os.umask(0o077)  # whatever a service creates in the data directory is the server's alone
    try:
        return serve(config, ready_file=args.ready_file)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _keys_store(args: argparse.Namespace) -> KeyStore:
    os.umask(0o077)
    try:
        config = load_config(args.config, overrides={"data_dir": args.data})
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if (problem := _data_dir_problem(config.data_dir)) is not None:
        raise SystemExit(f"error: {problem}")
    return KeyStore(config.keys_file)


def _keys_create(args: argparse.Namespace) -> int:
    keys = _keys_store(args)
    key, record = keys.create(Role.parse(args.role), args.name)
    keys.close()
    print(key)
    print(f"created {record.role.name.lower()} key {record.key_id}; it is shown only now",
          file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    keys = _keys_store(args)
    for k in keys.list():
        state = f"revoked {k.revoked}" if k.revoked else "active"
        print(f"{k.key_id}  {k.role.name.lower():6}  {k.created}  {state:30}  {k.name}")
    keys.close()
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    keys = _keys_store(args)
    try:
        keys.revoke(args.key_id)
    finally:
        keys.close()
    print(f"revoked key {args.key_id}")
    return 0


def _keys_export(args: argparse.Namespace) -> int:
    import yaml

    from gristmill.common.keyfile import dump_key_file

    keys = _keys_store(args)
    try:
        text = dump_key_file(keys)
    finally:
        keys.close()
    if args.secret:
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": args.secret, "namespace": args.namespace,
                               "labels": {"app.kubernetes.io/part-of": "gristmill"}},
                  "stringData": {"keys.json": text}}
        class Literal(yaml.SafeDumper):
            """Multi-line strings as YAML block literals (readable in the Secret)."""

        Literal.add_representer(str, lambda d, v: d.represent_scalar(
            "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))
        text = yaml.dump(secret, Dumper=Literal, sort_keys=False)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)  # servers reading the file never see half of it
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(commands: Any) -> None:
    """Add ``serve`` and ``keys`` to the CLI's sub-commands."""
    p = commands.add_parser(
        "serve", help="run gristmill services (all installed ones by default)",
        description="Run gristmill services in one process on one port. Without --services, "
        "every installed service runs (the embedded default: filesystem storage under --data). "
        "Settings come from --config (YAML), GRISTMILL_* variables and these flags.")
    p.add_argument("--data", type=Path, help="data directory (config key data_dir)")
    p.add_argument("--config", type=Path, help="YAML config file (env GRISTMILL_CONFIG)")
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 7450; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9450)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--services", help="comma-separated subset, e.g. 'store'")
    p.add_argument("--storage", choices=["fs", "ceph"],
                   help="where the store keeps objects: fs (files under --data, the default) "
                        "or ceph (a RADOS pool, which holds the catalog too)")
    p.add_argument("--ceph-conf", type=Path, help="the cluster's ceph.conf (with --storage ceph)")
    p.add_argument("--ceph-pool", help="RADOS pool for gristmill's objects (default gristmill)")
    p.add_argument("--ceph-keyring", type=Path, help="keyring file (default: as ceph.conf says)")
    p.add_argument("--ceph-timeout", type=int, metavar="SECONDS",
                   help="seconds one cluster operation may take (default 5)")
    p.add_argument("--ceph-catalog", choices=["pool", "local"],
                   help="where the catalog lives with --storage ceph: pool (default; shared by "
                        "every replica) or local (SQLite under --data, one replica)")
    p.add_argument("--no-auth", action="store_true", help="accept calls without API keys "
                   "(for local experiments only)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--ready-file", type=Path, help="write {\"port\": ..., \"metrics_port\": ...} "
                   "as JSON here once serving")
    p.set_defaults(handler=_serve)

    keys = commands.add_parser("keys", help="create, list and revoke API keys",
                               description="Manage API keys stored (hashed) in the data "
                               "directory. Servers see changes at once.")
    kc = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, help="data directory of the server")
    common.add_argument("--config", type=Path, help="YAML config file")
    p = kc.add_parser("create", parents=[common], help="create a key and print it (only once)")
    p.add_argument("--role", default="reader", choices=["reader", "writer", "admin"])
    p.add_argument("--name", default="", help="who or what the key is for")
    p.set_defaults(handler=_keys_create)
    p = kc.add_parser("list", parents=[common], help="list keys (ids and roles, no secrets)")
    p.set_defaults(handler=_keys_list)
    p = kc.add_parser("revoke", parents=[common], help="revoke a key by id")
    p.add_argument("key_id")
    p.set_defaults(handler=_keys_revoke)
    p = kc.add_parser(
        "export", parents=[common], help="write the keys' hashes as a shared key file",
        description="Print every key's id, role and sha256 (never a secret) as the JSON file "
        "that servers with auth.shared_keys_file read, or as a Kubernetes Secret holding it "
        "(key keys.json). Servers re-read the file when it changes.")
    p.add_argument("--out", type=Path, help="write to this file (atomically) instead of stdout")
    p.add_argument("--secret", metavar="NAME", help="print a Kubernetes Secret of this name "
                   "holding the file as keys.json (e.g. gristmill-api-keys)")
    p.add_argument("--namespace", default="gristmill", help="the Secret's namespace "
                   "(default gristmill)")
    p.set_defaults(handler=_keys_export)

    try:  # the store's maintenance commands, where the store service is installed
        from gristmill.store.admin import register as register_store_commands
    except ImportError:
        return
    register_store_commands(commands)
