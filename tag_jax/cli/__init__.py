"""`tag-jax`: plan a training step, compare it with the hand-written plans, inspect topologies.

    tag-jax plan --model gpt2 --size small --topology 2x4-v100-25gbe --out plan.json
    tag-jax compare --model mlp --size toy --budget 1
    tag-jax topology 2x4-v100-25gbe          # or a JSON file; --validate FILE checks one

Each subcommand is a module of this package with `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> int`; adding one (e.g. `train-policy`) is one more module in `COMMANDS`.
Bad input ends with exit status 2 (or a command's own status) and one line on stderr: `CLIError`
and the library's error types, which are ValueErrors; `--traceback` shows the whole of it. Other
exceptions are bugs and keep their traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from tag_jax.cli import compare, plan, topology, train_policy
from tag_jax.cli.inputs import CLIError, one_line

COMMANDS = (plan, compare, topology, train_policy)
PROG = "tag-jax"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (it normally prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__.split("\n\n")[1]
    parser = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Plan a JAX training step for a cluster (tag_jax), compare the plan\n"
                                 "with the hand-written ones, inspect cluster topologies.",
                     epilog=f"examples:\n{examples}\n\nRun 'tag-jax COMMAND --help' for a command's "
                            "options and more examples.")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the full Python traceback (for bug reports)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION,
                           epilog=command.epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "devices", None) is not None:
        simulated_devices(args.devices)
    try:
        return args.run(args)
    except (CLIError, KeyError, ValueError, OSError) as exc:  # TopologyError, PlanningError: ValueError
        if args.traceback:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"{PROG} {args.command}: error: {one_line(message)}", file=sys.stderr)
        return exc.status if isinstance(exc, CLIError) else 2


def simulated_devices(n: int) -> None:
    """Ask for n simulated CPU devices, as `python -m tag_jax` does: only entry points set
    XLA_FLAGS (house rule 5), and only when the environment has not chosen a count already.
    It takes effect because JAX reads the flag when its backends start, on first use."""
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={n}").strip()


if __name__ == "__main__":
    sys.exit(main())
