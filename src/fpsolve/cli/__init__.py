"""The ``fpsolve`` command: ``fpsolve demo``, ``fpsolve plugins``, ``fpsolve train-reference``, ...

This package is the command line's one home: this module dispatches, and each sub-command is one
module beside it (:data:`COMMANDS`): ``demo``, ``bench``, ``sample``, ``plugins`` and
``train_reference``. A command module holds its argument parsing and its printing; the work it
calls lives in the library. Command modules are imported only when used, so ``fpsolve --help``
stays fast and optional dependencies are needed only by the commands that use them.

Errors are one line on stderr and a non-zero exit status: 2 for a bad command line (an unknown
command, with the closest match; a bad option; an unusable ``--out``), 1 for a failure while
running. fpsolve's own errors never show a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ..errors import FpsolveError, InvalidOptionError

__all__ = ["main", "COMMANDS", "OneLineParser", "unknown_command_message"]

#: sub-command -> (module, one-line help). Each module defines ``add_arguments(parser)`` and
#: ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fpsolve.cli.demo", "sample a reference model sequentially and with TAA, and compare"),
    "bench": ("fpsolve.cli.bench", "benchmark samplers x solvers x tolerances against sequential sampling"),
    "plugins": ("fpsolve.cli.plugins", "list every registered sampler, solver, stopping rule, initializer"),
    "train-reference": ("fpsolve.cli.train_reference", "train the shipped digits UNet (reproducible)"),
    "sample": ("fpsolve.cli.sample", "sample a reference model; under torchrun, sharded over the ranks"),
}

#: exit status of a bad command line (argparse's convention)
USAGE_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``fpsolve sample: --steps: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: <message> (see <prog> --help)`` on one line and exit 2."""
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _version() -> str:
    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command (modules are imported lazily at run time)."""
    parser = OneLineParser(prog="fpsolve", description="Parallel diffusion sampling.")
    parser.add_argument("--version", action="version", version=f"fpsolve {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def unknown_command_message(name: str) -> str:
    """``unknown command 'sampel'; did you mean 'sample'?`` (the valid commands when nothing is close)."""
    close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid commands: {', '.join(COMMANDS)}"
    return f"unknown command {name!r}; {hint}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fpsolve`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        # fpsolve, fpsolve --help, fpsolve --version, or an option before the command
        if not argv:
            parser.print_help()
            return 0
        try:
            parser.parse_args(argv[:1])
        except SystemExit as done:  # --help and --version exit 0, a bad option exits 2
            return int(done.code or 0)
        parser.print_help()
        return USAGE_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fpsolve: {unknown_command_message(name)}", file=sys.stderr)
        return USAGE_ERROR
    module = importlib.import_module(COMMANDS[name][0])
    command = OneLineParser(prog=f"fpsolve {name}", description=COMMANDS[name][1])
    module.add_arguments(command)
    try:
        args = command.parse_args(rest)
    except SystemExit as done:
        return int(done.code or 0)

    try:
        return int(module.run(args) or 0)
    except InvalidOptionError as error:
        print(f"fpsolve {name}: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    except (FpsolveError, OSError) as error:
        print(f"fpsolve {name}: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fpsolve {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
