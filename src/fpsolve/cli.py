"""The ``fpsolve`` command: ``fpsolve demo``, ``fpsolve plugins``, ``fpsolve train-reference``, ...

Each sub-command lives in its own module and is imported only when used, so ``fpsolve --help``
stays fast and optional dependencies are needed only by the commands that use them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "COMMANDS"]

#: sub-command -> (module, one-line help). Each module defines ``add_arguments(parser)`` and
#: ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fpsolve.demo", "sample a reference model sequentially and with TAA, and compare"),
    "bench": ("fpsolve.bench.cli", "benchmark samplers x solvers x tolerances against sequential sampling"),
    "plugins": ("fpsolve.plugins_cli", "list every registered sampler, solver, stopping rule, initializer"),
    "train-reference": ("fpsolve.models.digits", "train the shipped digits UNet (reproducible)"),
    "sample": ("fpsolve.sample_cli", "sample a reference model; under torchrun, sharded over the ranks"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command (modules are imported lazily at run time)."""
    parser = argparse.ArgumentParser(prog="fpsolve", description="Parallel diffusion sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fpsolve`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    command = argparse.ArgumentParser(prog=f"fpsolve {name}", description=COMMANDS[name][1])
    module.add_arguments(command)
    return int(module.run(command.parse_args(rest)) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
