"""Answers to Gadgetron QUERY messages (id 6), as `gadgetron_ismrmrd_client -Q NAME` sends them.

Test harnesses probe a server with `-Q gadgetron::info` (or `::version`) before streaming. The
keys Gadgetron itself answers are answered here with what holds for this server (no MATLAB, no
CUDA toolkit: GPUs are reached through onnxruntime's providers); `pisf::*` keys add what only
this server knows. A key outside the table gets a TEXT error naming the known keys (Gadgetron
itself drops the connection there).
"""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Callable

from ..chain import ChainRepository


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def server_version() -> str:
    return _version("pisf-inline")


def _system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:  # onnxruntime missing or broken: the zerofill chain still works
        return []


def _cuda() -> bool:
    return any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in _providers())


class QueryAnswers:
    """The table of known queries for one server (its chain repository)."""

    def __init__(self, repository: ChainRepository, aliases: dict[str, str] | None = None):
        self.repository = repository
        self.aliases = dict(aliases or {})
        self.answers: dict[str, Callable[[], str]] = {
            "gadgetron::info": self.info,
            "gadgetron::version": server_version,
            "gadgetron::build": lambda: f"pisf-inline {server_version()} (Python {platform.python_version()})",
            "gadgetron::info::memory": lambda: str(_system_memory()),
            "gadgetron::info::python": lambda: "1",
            "gadgetron::info::matlab": lambda: "0",
            "gadgetron::info::cuda": lambda: "1" if _cuda() else "0",
            "ismrmrd::version": lambda: _version("ismrmrd"),
            "pisf::version": server_version,
            "pisf::configs": self.configs,
            "pisf::providers": lambda: ";".join(_providers()),
        }

    def configs(self) -> str:
        """Chain names, one a line; aliases as `alias -> chain`."""
        lines = self.repository.names()
        lines += [f"{alias} -> {target}" for alias, target in sorted(self.aliases.items())]
        return "\n".join(lines)

    def info(self) -> str:
        providers = _providers()
        memory = _system_memory()
        aliases = ", ".join(f"{a} -> {t}" for a, t in sorted(self.aliases.items())) or "none"
        return "\n".join([
            "PISF inline reconstruction server",
            f"  -- Version            : {server_version()}",
            "  -- Protocol           : ISMRMRD streaming (gadgetron_ismrmrd_client, FIRE/OpenRecon clients)",
            f"  -- Python             : {platform.python_version()} ({sys.executable})",
            f"  -- ismrmrd            : {_version('ismrmrd')}",
            f"  -- onnxruntime        : {_version('onnxruntime')} ({', '.join(providers) or 'not available'})",
            "  -- Python Support     : YES",
            "  -- Matlab Support     : NO",
            f"  -- CUDA Support       : {'YES (onnxruntime)' if _cuda() else 'NO'}",
            f"  -- System Memory size : {memory / 2 ** 20:.0f} MB",
            f"  -- Chains             : {', '.join(self.repository.names()) or 'none'}",
            f"  -- Aliases            : {aliases}",
            "",
        ])

    def answer(self, query: str) -> str:
        """The answer text; raises KeyError (message names the known queries) for unknown keys."""
        key = query.strip().rstrip("\0").strip()
        handler = self.answers.get(key)
        if handler is None:
            raise KeyError(f"unknown query {key!r}; this server answers {', '.join(sorted(self.answers))}")
        return handler()
