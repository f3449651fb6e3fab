"""The `tfpar` command line: `tfpar --version`, `devices`, `server`, `launch`.

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
    server.add_argument(
        "--profiler-port",
        type=int,
        metavar="PORT",
        help="also run TensorFlow's profiler service on PORT, for "
        "DeviceUtilization's remote windows",
    )

    launch = commands.add_parser(
        "launch",
        help="run a command as N local workers of one cluster (TF_CONFIG set)",
        usage="tfpar launch [-h] --workers N [--pin-cores] [--port-base P] "
        "-- COMMAND [ARG ...]",
        description="Start N local worker processes of COMMAND, each with the "
        "TF_CONFIG of one worker task of a cluster on 127.0.0.1, prefix their "
        "output with [worker i], and stop them all when one fails or on Ctrl-C. "
        "Exits with the failing worker's status (128+signal if killed), 130 "
        "after Ctrl-C, 143 after SIGTERM, 0 if every worker exits with 0.",
    )
    launch.add_argument(
        "--workers", type=int, required=True, metavar="N", help="number of workers"
    )
    launch.add_argument(
        "--pin-cores",
        action="store_true",
        help="pin worker i to core i %% cores; TF_NUM_INTRAOP_THREADS=1, "
        "TF_NUM_INTEROP_THREADS=2 unless set",
    )
    launch.add_argument(
        "--port-base",
        type=int,
        metavar="P",
        help="worker i listens on port P+i (default: free ports)",
    )
    launch.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND [ARG ...]",
        help="the program each worker runs, e.g. -- python train.py",
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
            check_int(
                "--profiler-port",
                args.profiler_port,
                minimum=1,
                maximum=65535,
                allow_none=True,
            )
            task = server.read_tf_config()
            server.validate_task(
                task.cluster,
                task.task_type,
                task.task_index,
                core=args.core,
                parent_pid=args.parent_pid,
                profiler_port=args.profiler_port,
            )
        server.serve(
            task.cluster,
            task.task_type,
            task.task_index,
            core=args.core,
            parent_pid=args.parent_pid,
            profiler_port=args.profiler_port,
        )
        return 0
    if args.command == "launch":
        from tfpar import launch

        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        with _user_errors(parser, "launch"):
            check_int("--workers", args.workers, minimum=1)
            launch.check_port_base("--port-base", args.port_base, args.workers)
            if not command:
                raise ValueError(
                    "No command to run: give it after `--`, e.g. "
                    "`tfpar launch --workers 2 -- python train.py`."
                )
            # Checks the program and the ports before starting anything.
            launch.check_command(command)
            if args.port_base is not None:
                launch.check_ports_free(args.port_base, args.workers)
        return launch.launch(
            command,
            num_workers=args.workers,
            pin_cores=args.pin_cores,
            port_base=args.port_base,
        )
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
