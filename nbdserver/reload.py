"""SIGHUP: re-read the ``--config`` file and change the set of exports while serving.

Theory of operation
-------------------
:func:`plan_reload` (pure) compares the exports in force with the ones the file now
describes, by name and by their whole :class:`~nbdserver.config.ExportConfig`: an export
whose settings are unchanged keeps its open backend and its :class:`Export` object, so
connections to it never notice; a new name is opened; a name that disappeared stops being
offered; an export whose settings changed is both (new connections get the new one).

:class:`Reloader` does the opening and keeps the old configuration when anything is
wrong: a file that no longer parses, an export whose file cannot be opened. The error is
logged with what to fix, and nothing changes. Only exports are reloaded; other settings
(port, workers, ...) need a restart, and a reload that changes them says so.

Connections already open to a removed export are left to finish (their backend stays
open until the server exits): a reload never cuts a client off. With worker processes,
the parent replaces every worker by a fresh fork that knows the new exports, and the old
workers stop taking connections and exit once their last one closes
(nbdserver.workers.Acceptor.roll).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from nbdserver.backends.base import Backend
from nbdserver.config import ExportConfig, ServerConfig, build_config
from nbdserver.errors import ConfigError
from nbdserver.exposure import startup_warnings
from nbdserver.server import Export

__all__ = ["ReloadPlan", "Reloader", "plan_reload"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload changes, by export name."""

    added: tuple[ExportConfig, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]

    @property
    def changes_anything(self) -> bool:
        return bool(self.added or self.removed)


def plan_reload(current: Mapping[str, ExportConfig], wanted: Sequence[ExportConfig]) -> ReloadPlan:
    """Compare the exports in force with the wanted ones (a changed export is removed
    and added again)."""
    wanted_by_name = {e.name: e for e in wanted}
    unchanged = tuple(n for n, e in wanted_by_name.items() if current.get(n) == e)
    removed = tuple(n for n in current if n not in unchanged)
    added = tuple(e for n, e in wanted_by_name.items() if n not in unchanged)
    return ReloadPlan(added, removed, unchanged)


def _restart_only_changes(old: ServerConfig, new: ServerConfig) -> list[str]:
    return [
        f.name
        for f in fields(ServerConfig)
        if f.name != "exports" and getattr(old, f.name) != getattr(new, f.name)
    ]


class Reloader:
    """The exports in force and how to rebuild them from the command line + file."""

    def __init__(
        self,
        cli: Mapping[str, Any],
        config: ServerConfig,
        exports: Sequence[Export],
        open_export: Callable[[ExportConfig], Export],
    ) -> None:
        """``open_export`` opens one configured export (raises ConfigError)."""
        self.cli = dict(cli)
        self.config = config
        self.configs = {e.name: e for e in config.exports}
        self.exports = {e.info.name: e for e in exports}
        self._open_export = open_export
        #: Exports no longer offered; closed when the server exits.
        self.retired: list[Export] = []

    def reload(self) -> ReloadPlan | None:
        """Re-read the config file; return what changed, or None (old config kept)."""
        if "config" not in self.cli:
            logger.warning("SIGHUP: no --config file to reload; nothing changed")
            return None
        try:
            config = build_config(self.cli)
        except ConfigError as exc:
            logger.error("reload failed, keeping the old configuration: %s", exc)
            return None
        plan = plan_reload(self.configs, config.exports)
        opened: list[Export] = []
        try:
            for ec in plan.added:
                opened.append(self._open_export(ec))
        except (ConfigError, OSError) as exc:
            for export in opened:
                export.backend.close()
            logger.error("reload failed, keeping the old configuration: %s", exc)
            return None
        ignored = _restart_only_changes(self.config, config)
        if ignored:
            logger.warning(
                "reload: %s changed in the file; only exports are reloaded, restart for the rest",
                ", ".join(ignored),
            )
        for name in plan.removed:
            self.retired.append(self.exports.pop(name))
        for export in opened:
            self.exports[export.info.name] = export
        self.configs = {e.name: e for e in config.exports}
        before = startup_warnings(self.config)
        self.config = ServerConfig(**{**_as_kwargs(self.config), "exports": config.exports})
        for warning in startup_warnings(self.config):
            if warning not in before:  # what the new exports expose (e.g. no allow-list)
                logger.warning("reload: %s", warning)
        logger.info(
            "reloaded %s: exports %s (added %s, removed %s, unchanged %s)",
            self.cli["config"],
            list(self.exports),
            [e.name for e in plan.added],
            list(plan.removed),
            list(plan.unchanged),
        )
        return plan

    def backends(self) -> list[Backend]:
        """Every backend opened so far (in force or retired), to close at exit."""
        return [e.backend for e in [*self.exports.values(), *self.retired]]


def _as_kwargs(config: ServerConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(ServerConfig)}
