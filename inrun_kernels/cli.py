"""Command line: `python -m inrun_kernels demo [...]`."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "train on digits with flipped labels, report AUROC and overhead"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m inrun_kernels COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:8s} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "demo":
        from . import demo
        demo.main(argv[1:])
    return 0
