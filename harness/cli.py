"""`vwn`: train one run, submit a grid, watch its status, render its report, benchmark the model."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from harness.train import train_from_cli

    return train_from_cli(args.config, args.set, args.out)


def _report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    path = write_report(args.results, args.out)
    print(f"report: {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="vwn", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one run from a run-config YAML")
    train.add_argument("config", nargs="?", help="run config YAML (partial; defaults fill the rest)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set model.virtual_width=[2,3] (repeatable)")
    train.add_argument("--out", help="run folder (default: results/<config name>/<run id>)")
    train.set_defaults(handler=_train)

    report = commands.add_parser("report", help="regenerate plots and tables from a grid's run folders")
    report.add_argument("results", help="grid folder, e.g. results/quickstart")
    report.add_argument("--out", help="output folder (default: <results>/report)")
    report.set_defaults(handler=_report)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
