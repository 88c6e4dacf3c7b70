"""``fdistill`` entry point. Each subcommand lives in its own module under ``fdistill/cli/`` with
``register(subparsers)``; handlers parse arguments and call one library function."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: modules that add subcommands, in the order ``fdistill --help`` lists them
SUBCOMMAND_MODULES = ["distill", "evaluate", "diagnose", "demo"]

def _user_errors():
    """What the CLI prints as one line: every fdistill error (:mod:`fdistill.errors`) and a
    missing file."""
    from ..errors import FdistillError

    return (FdistillError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdistill",
        description="Feature Distillation (Wei et al., ICCV 2023): distil any pre-trained vision model into a "
                    "ViT that fine-tunes better; evaluate and diagnose teacher and student side by side.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"fdistill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--trust-recorded-spec", action="store_true",
                        help="build model specs recorded in checkpoints / classifier.json even when that runs code "
                             "('python:' specs, trust_remote_code); may also follow the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{name}":
                continue  # subcommand module not part of this build
            raise
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..teachers.trust import FLAG, trust_recorded_specs

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    trusted = FLAG in argv  # accepted anywhere on the line, before or after the command
    args = parser.parse_args([a for a in argv if a != FLAG])
    from ..logs import configure_logging

    configure_logging(args.verbose)  # third-party INFO lines go to the run's run.log, not the terminal
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from ..speed import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        with trust_recorded_specs(trusted):
            result = args.func(args)
    except _user_errors() as e:
        if args.verbose:
            raise
        print(f"fdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
