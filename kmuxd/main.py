"""``kmuxd``: run the daemon in the foreground, or only check a configuration.

``kmuxd install-units`` and ``kmuxd uninstall-units`` put the systemd units
in place and take them away (:mod:`kmuxd.system.install`, docs/systemd.md).
"""

from __future__ import annotations

import argparse
import sys

from kmux.errors import ConfigInvalid

from kmuxd import __version__
from kmuxd.system.config import load_config
from kmuxd.system.log import configure

DEFAULT_CONFIG = "/etc/kmuxd/kmuxd.toml"


#: Subcommands; anything else is the daemon's own command line.
UNIT_COMMANDS = ("install-units", "uninstall-units")


def build_parser() -> argparse.ArgumentParser:
    """The daemon's own command line (also the source of the kmuxd(8) man page)."""
    parser = argparse.ArgumentParser(
        prog="kmuxd",
        description="message multiplexer over shared TCP connection groups",
        epilog="also: kmuxd install-units [--help], kmuxd uninstall-units [--help] (systemd units)",
    )
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"TOML configuration (default {DEFAULT_CONFIG})")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit (0 = valid)")
    parser.add_argument("--log-format", choices=("auto", "console", "json", "journal"), help="override daemon.log_format")
    parser.add_argument("--version", action="version", version=f"kmuxd {__version__} ({_build()})")
    return parser


def _build() -> str:
    from kmuxd._compiled import status

    s = status()
    return "data path compiled by mypyc" if s["compiled"] else f"pure Python: {s['reason']}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in UNIT_COMMANDS:
        from kmuxd.system.install import main as units_main

        return units_main(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigInvalid as exc:
        lines = exc.lines()
        if len(lines) == 1:
            print(f"kmuxd: invalid configuration: {lines[0]}", file=sys.stderr)
        else:
            print(f"kmuxd: invalid configuration, {len(lines)} problems:", file=sys.stderr)
            for line in lines:
                print(f"  {line}", file=sys.stderr)
        return 1
    if args.check:
        print(f"kmuxd: {args.config}: ok ({len(config.groups)} group(s): {', '.join(config.groups)})")
        for warning in config.warnings:
            print(f"kmuxd: warning: {warning}", file=sys.stderr)
        return 0
    configure(args.log_format or config.daemon.log_format, config.daemon.log_level)
    from kmuxd.io.daemon import run

    try:
        run(config)
    except OSError as exc:
        print(f"kmuxd: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
