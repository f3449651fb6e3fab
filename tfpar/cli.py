"""The `tfpar` command line: `tfpar --version`, `tfpar devices`, `tfpar server`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tfpar._version import __version__


def build_parser() -> argparse.ArgumentParser:
    """Returns the `tfpar` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="tfpar",
        description="Multi-device training for Keras 3 on TensorFlow.",
    )
    parser.add_argument("--version", action="version", version=f"tfpar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    devices = commands.add_parser(
        "devices",
        help="list the devices tfpar sees and the ones a strategy would use",
        description="List physical and logical devices, and the devices a tfpar "
        "strategy uses when given devices=None.",
    )
    devices.add_argument(
        "--simulate",
        type=int,
        metavar="N",
        help="split the host CPU into N logical devices first (tfpar.simulate_devices)",
    )

    server = commands.add_parser(
        "server",
        help="run one task of a cluster described by TF_CONFIG",
        description="Run one tf.distribute.Server task (worker or ps) as TF_CONFIG "
        "describes it, until killed. The server listens on all interfaces without "
        "authentication: run it only on an isolated network.",
    )
    server.add_argument(
        "--core", type=int, help="pin the process to this CPU core, one TF thread"
    )
    server.add_argument(
        "--parent-pid",
        type=int,
        help="exit when this process is no longer the parent (used by LocalCluster)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `tfpar` command.

    Args:
        argv: Arguments without the program name; `None` reads `sys.argv`.

    Returns:
        The exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "devices":
        from tfpar import devices

        if args.simulate is not None:
            devices.simulate_devices(args.simulate)
        print(devices.DeviceReport.collect().format())
        return 0
    if args.command == "server":
        from tfpar import server

        task = server.read_tf_config()
        server.serve(
            task.cluster,
            task.task_type,
            task.task_index,
            core=args.core,
            parent_pid=args.parent_pid,
        )
        return 0
    parser.print_help()
    return 0
