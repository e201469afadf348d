"""`vwn`: train one run, submit a grid, watch its status, render its report, benchmark the model."""

from __future__ import annotations

import argparse
import sys


def _environment_error() -> str | None:
    """What is wrong with the environment settings that training reads (VWN_CPU_GEMM), before any work starts."""
    from harness.model import gemm

    try:
        gemm.use_onednn()
    except (ValueError, RuntimeError) as error:
        return str(error)
    return None


def _train(args: argparse.Namespace) -> int:
    from harness.train import train_from_cli

    return train_from_cli(args.config, args.set, args.out)


def _submit(args: argparse.Namespace) -> int:
    from harness.launch import submit_command

    return submit_command(args.grid, cluster=args.cluster, dry_run=args.dry_run, max_parallel=args.max_parallel,
                          retry_failed=args.retry_failed, overrides=args.set, results=args.results)


def _status(args: argparse.Namespace) -> int:
    from harness.launch import status_command

    return status_command(args.results, watch=args.watch is not None, interval_s=args.watch or 10.0)


def _bench(args: list[str]) -> int:
    from harness.bench import bench_main

    return bench_main(args)


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

    submit = commands.add_parser("submit", help="train every run of a grid YAML (skips finished, resumes unfinished)")
    submit.add_argument("grid", help="grid YAML, e.g. experiments/quickstart.yaml")
    submit.add_argument("--cluster", choices=["local", "slurm", "debug"],
                        help="where runs execute (default: the grid's launcher.cluster, else local)")
    submit.add_argument("--dry-run", action="store_true", help="print the runs and their state; train nothing")
    submit.add_argument("--max-parallel", type=int, metavar="N", help="runs at once (SLURM: array parallelism)")
    submit.add_argument("--retry-failed", action="store_true", help="train failed and diverged runs again")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run (e.g. train.tokens=1e6) or the launcher (launcher.time=60)")
    submit.add_argument("--results", default="results", help="results root (default: results)")
    submit.set_defaults(handler=_submit)

    status = commands.add_parser("status", help="one row per run of a grid folder, from its run folders alone")
    status.add_argument("results", help="grid folder, e.g. results/quickstart")
    status.add_argument("--watch", nargs="?", type=float, const=10.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 10) until every run has finished")
    status.set_defaults(handler=_status)

    commands.add_parser("bench", help="training-step throughput, MFU and width overheads (see vwn bench -h)",
                        add_help=False)

    report = commands.add_parser("report", help="regenerate plots and tables from a grid's run folders")
    report.add_argument("results", help="grid folder, e.g. results/quickstart")
    report.add_argument("--out", help="output folder (default: <results>/report)")
    report.set_defaults(handler=_report)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["bench"], ["train"], ["submit"]) and (error := _environment_error()):
        print(f"error: {error}", file=sys.stderr)
        return 2
    if argv[:1] == ["bench"]:  # vwn bench owns its flags
        return _bench(argv[1:])
    args = parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
