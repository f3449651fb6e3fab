"""The `tfpar` command line: `tfpar --version`, `tfpar devices`, `tfpar server`.

A mistake in the command (a bad option, an invalid `TF_CONFIG`) ends it with
one line on stderr, `tfpar COMMAND: error: ...`, and exit status 2, as
argparse does for the options it checks itself; any other error shows its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence

from tfpar._validation import check_int
from tfpar._version import __version__

# What the checks of the user's input raise (TF_CONFIG's reader included).
_USER_ERRORS = (ValueError, TypeError)


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

    Raises:
        SystemExit: With status 2 for a mistake in the command (argparse's
            convention), after one line on stderr saying what is wrong.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "devices":
        from tfpar import devices

        if args.simulate is not None:
            with _user_errors(parser, "devices"):
                check_int("--simulate", args.simulate, minimum=1)
                devices.simulate_devices(args.simulate)
        print(devices.DeviceReport.collect().format())
        return 0
    if args.command == "server":
        from tfpar import server

        with _user_errors(parser, "server"):
            check_int("--core", args.core, minimum=0, allow_none=True)
            check_int("--parent-pid", args.parent_pid, minimum=1, allow_none=True)
            task = server.read_tf_config()
            server.validate_task(
                task.cluster,
                task.task_type,
                task.task_index,
                core=args.core,
                parent_pid=args.parent_pid,
            )
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


@contextlib.contextmanager
def _user_errors(parser: argparse.ArgumentParser, command: str) -> Iterator[None]:
    """Turns a `_USER_ERRORS` exception into one line on stderr and exit status 2."""
    try:
        yield
    except _USER_ERRORS as err:
        message = " ".join(str(err).splitlines())
        parser.exit(2, f"{parser.prog} {command}: error: {message}\n")
