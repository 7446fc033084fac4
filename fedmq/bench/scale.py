"""``fedmq bench scale``: being written."""

from __future__ import annotations

import argparse

HELP = "(being written)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options yet."""


def run(args: argparse.Namespace) -> int:
    print("not written yet")
    return 2
