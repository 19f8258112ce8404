"""What a gristmill service package provides so that any server can host it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import grpc

from gristmill.common.auth import Role
from gristmill.common.config import ConfigError, ServerConfig

__all__ = ["Resource", "ServiceContext", "ServiceSpec", "available_services", "select_services"]


class Resource(Protocol):
    """Something a service opened and the server closes on shutdown."""

    def close(self) -> None:
        """Release it."""


@dataclass
class ServiceContext:
    """Handed to each service's ``build``: config and in-process siblings."""

    config: ServerConfig
    #: Domain objects of services already built in this process, by service
    #: name, so that e.g. ingest calls store in-process in the all-in-one server.
    local: dict[str, Any] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)
    #: Probes by proto service name, run every few seconds while serving: one
    #: that raises turns that service (and the server's overall status) to
    #: NOT_SERVING on health until it passes again (e.g. the Ceph cluster is down).
    health_checks: dict[str, Callable[[], None]] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceSpec:
    """A service: its proto name, how to build and register it, who may call what."""

    #: Short name used by ``--services`` (e.g. "store").
    name: str
    #: Fully qualified proto service name (e.g. "gristmill.v1.StoreService").
    full_name: str
    #: Registers the servicer(s) on the server; may add to ``ctx.local``.
    build: Callable[[ServiceContext, grpc.Server], None]
    #: Minimum role per method name (e.g. {"ListDatasets": Role.READER}).
    roles: dict[str, Role]
    #: Services that, when they run in the same process, are built first
    #: (this one uses their domain objects from ``ServiceContext.local``).
    after: tuple[str, ...] = ()

    def method_roles(self) -> dict[str, Role]:
        """Roles keyed by full method path, as interceptors see it."""
        return {f"/{self.full_name}/{m}": r for m, r in self.roles.items()}


def available_services() -> dict[str, ServiceSpec]:
    """Every service installed in this environment (entry point group ``gristmill.services``)."""
    found: dict[str, ServiceSpec] = {}
    for ep in entry_points(group="gristmill.services"):
        spec = ep.load()
        if not isinstance(spec, ServiceSpec):
            raise TypeError(f"entry point {ep.value} is not a ServiceSpec")
        found[spec.name] = spec
    return found


def select_services(names: tuple[str, ...] | list[str]) -> list[ServiceSpec]:
    """The named services (all installed ones if ``names`` is empty), in start-up order."""
    installed = available_services()
    if not installed:
        raise ConfigError("no gristmill services are installed; install gristmill-store (and "
                          "the others) into this environment")
    wanted = list(names) or list(installed)
    unknown = [n for n in wanted if n not in installed]
    if unknown:
        raise ConfigError(f"unknown service(s) {', '.join(unknown)}; installed: "
                          f"{', '.join(sorted(installed))}")
    chosen = {n: installed[n] for n in dict.fromkeys(wanted)}
    return _start_order(chosen)


def _start_order(chosen: dict[str, ServiceSpec]) -> list[ServiceSpec]:
    """Services ordered so each comes after those it names in ``after`` (else by name)."""
    done: list[ServiceSpec] = []
    placed: set[str] = set()
    pending = dict(sorted(chosen.items()))
    while pending:
        ready = [n for n, spec in pending.items()
                 if all(d in placed or d not in chosen for d in spec.after)]
        if not ready:
            raise ConfigError("services name each other in 'after' in a cycle: "
                              + ", ".join(sorted(pending)))
        for name in ready:
            done.append(pending.pop(name))
            placed.add(name)
    return done
