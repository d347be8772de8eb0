"""`tsunagu stack` on the command line: its arguments, its help and its exit codes.

Nothing heavy is imported before a command runs: `tsunagu --help` builds this parser too."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tsunagu.stack import COMPONENTS, ENGINE_ENV, FAILED, INTERRUPTED, NOT_UP, OK, OPTIONAL_COMPONENTS, USAGE

DESCRIPTION = "The real local infrastructure on 127.0.0.1 (configured by TSUNAGU_STACK_* variables)."
EXIT_CODES = f"""\
exit codes:
  {OK}    up: every component named answers; down: all stopped; status: every one named answers; env: printed
  {FAILED}    a component failed to install, start or stop (its line says why, with its log's last lines)
  {USAGE}    usage: an unknown action or component, or a bad TSUNAGU_STACK_* value (one line on stderr)
  {NOT_UP}    status: at least one of the components named does not answer (also when none runs at all)
  {INTERRUPTED}  interrupted (the components already started keep running)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tsunagu stack` (here and as the `stack` command of `tsunagu`)."""
    parser.add_argument(
        "action",
        choices=["up", "down", "status", "env"],
        help="up: start and wait until each answers; down: stop (data kept); status: which answer; "
        "env: print `export` lines for eval",
    )
    parser.add_argument(
        "components",
        nargs="*",
        metavar="COMPONENT",
        help=f"{' '.join(COMPONENTS)} (default: all of these), or {' or '.join(OPTIONAL_COMPONENTS)} "
        "(env: TSUNAGU_REDIS_URL points at that set)",
    )
    parser.add_argument("--purge", action="store_true", help="down: also delete the data of the stopped components")
    parser.add_argument(
        "--tls", action="store_true", help="env: the TLS-only ports, mTLS with the development PKI (.stack/tls)"
    )
    engines = " ".join(f"{key}={value}" for key, value in ENGINE_ENV.items())
    parser.add_argument(
        "--engines",
        action="store_true",
        help=f"env: also {engines}, so that services use the stack instead of their in-process engines",
    )


def build_parser(prog: str = "tsunagu stack") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed `tsunagu stack` command line; returns the exit code (EXIT_CODES)."""
    import subprocess

    from tsunagu.stack.commands import cmd_down, cmd_env, cmd_status, cmd_up
    from tsunagu.stack.components import components
    from tsunagu.stack.settings import StackError, load_settings

    try:
        settings = load_settings()
        if args.action == "env":
            components(settings, args.components)  # unknown names are refused here too
            return cmd_env(settings, args.tls, args.engines, args.components)
        selected = components(settings, args.components)
        if args.action == "up":
            return cmd_up(settings, selected)
        if args.action == "down":
            return cmd_down(settings, selected, args.purge)
        return cmd_status(settings, selected)
    except StackError as error:
        print(f"tsunagu stack: {error.reason}", file=sys.stderr)
        return USAGE
    except (OSError, subprocess.SubprocessError) as error:
        print(f"tsunagu stack: {type(error).__name__}: {error}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print("tsunagu stack: interrupted (components already started keep running)", file=sys.stderr)
        return INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """`tsunagu stack ...`; returns the exit code (EXIT_CODES)."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else USAGE
    return run(args)
