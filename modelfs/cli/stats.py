"""``modelfs stats PATH``: what a running mount is doing."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..mounts import read_stats
from . import render


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("stats", help="what a running mount is doing")
    st.add_argument("mountpoint", type=Path)
    st.add_argument("--json", action="store_true", help="the raw counters, as JSON")
    st.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    render.stats(read_stats(args.mountpoint), args.json)
    return 0
