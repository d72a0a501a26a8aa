"""The `rwkv-pipeline` command line.

rwkv-pipeline print-config configs/quickstart.yaml train.lr_init=3e-4
"""

from __future__ import annotations

import argparse
import sys

from orchestration.config import ConfigError, dump_config, load_config


def _print_config(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-pipeline", description="RWKV-4 pretraining pipeline.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    commands = parser.add_subparsers(dest="command", required=True)

    show = commands.add_parser("print-config", help="Print the resolved config (YAML plus overrides).")
    show.add_argument("config", help="YAML run config.")
    show.add_argument("overrides", nargs="*", help="Dotted overrides, e.g. train.lr_init=3e-4.")
    show.set_defaults(handler=_print_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
