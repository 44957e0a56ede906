"""Supervisor subcommands of ``inferd`` (filled in by the supervisor issue)."""

from __future__ import annotations

import argparse


def add_supervisor_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``up``/``ps``/``stop``; none yet."""
    return None
