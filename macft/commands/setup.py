"""`macft setup llama-cpp`: build the pinned llama.cpp tools. The command is export's
(:mod:`export.command`); this module gives it the names every command module has."""

from __future__ import annotations

from export.command import SETUP_HELP as HELP
from export.command import add_setup_arguments as add_arguments
from export.command import setup as run

__all__ = ["HELP", "add_arguments", "run"]
