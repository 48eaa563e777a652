"""``rtdecoder phantom ...``: the simulated world's subcommands."""

from __future__ import annotations

import argparse


def add_phantom_commands(groups: argparse._SubParsersAction) -> None:
    """Register ``phantom`` and its subcommands on the top-level parser."""
    phantom = groups.add_parser("phantom", help="simulated subjects and scanner")
    phantom.add_subparsers(dest="phantom_command", metavar="ACTION", required=True)
