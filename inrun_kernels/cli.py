"""Command line: `python -m inrun_kernels demo [...]`, `python -m inrun_kernels report VALUES [...]`."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "train on digits with flipped labels, report AUROC and overhead",
                "report": "VALUES: Markdown report of saved values (report -h); without VALUES: "
                          "benchmarks/RESULTS.md from benchmark JSON (repo checkout)"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m inrun_kernels COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:8s} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "demo":
        from . import demo
        demo.main(argv[1:])
    if argv[0] == "report" and _values_report(argv[1:]):
        from .report import main as values_report
        return values_report(argv[1:])
    if argv[0] == "report":   # the benchmarks live in the repository, not in the package
        import os
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(repo, "benchmarks")) and repo not in sys.path:
            sys.path.insert(0, repo)
        try:
            from benchmarks.report import main as report_main
        except ImportError:
            print("report: benchmarks/ not found (run from a repository checkout)", file=sys.stderr)
            return 2
        return report_main(argv[1:])
    return 0


# options that take a value, of the values report and of benchmarks/report.py
_VALUED = {"--groups", "--names", "--top", "--out", "--texts", "--json", "--preface", "--estimators"}


def _values_report(args: list[str]) -> bool:
    """`report` with a VALUES file (a positional argument) or -h is the values report; without
    one it renders the benchmarks' RESULTS.md, as before."""
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a in ("-h", "--help"):
            return True
        elif a.startswith("-"):
            skip = a in _VALUED
        else:
            return True
    return False
