"""``kmuxd``: run the daemon in the foreground, or only check a configuration.

``kmuxd install-units`` and ``kmuxd uninstall-units`` put the systemd units
in place and take them away (:mod:`kmuxd.system.install`, docs/systemd.md).
``kmuxd handshake KIND`` writes a handshake file (:mod:`kmuxd.system.credentials`).

``--check`` validates the file, then says which capabilities the
configuration needs (and, under systemd, whether the process holds them:
ExecStartPre= runs with the service's own capabilities) and which secret
files others can read. Those are warnings: a group without its capability
fails only its own dials, and the check still exits 0.
"""

from __future__ import annotations

import argparse
import sys

from kmux.errors import ConfigInvalid

from kmuxd import __version__
from kmuxd.system.config import Config, load_config
from kmuxd.system.log import configure

DEFAULT_CONFIG = "/etc/kmuxd/kmuxd.toml"


#: Subcommands; anything else is the daemon's own command line.
UNIT_COMMANDS = ("install-units", "uninstall-units")
HANDSHAKE_COMMAND = "handshake"


def build_parser() -> argparse.ArgumentParser:
    """The daemon's own command line (also the source of the kmuxd(8) man page)."""
    parser = argparse.ArgumentParser(
        prog="kmuxd",
        description="message multiplexer over shared TCP connection groups",
        epilog="also: kmuxd install-units [--help], kmuxd uninstall-units [--help] (systemd units); "
               "kmuxd handshake KIND [--help] (write a handshake file)",
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
    if argv and argv[0] == HANDSHAKE_COMMAND:
        from kmuxd.system.credentials import main as handshake_main

        return handshake_main(argv[1:])
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
        for line in check_report(config):
            print(f"kmuxd: {line}")
        for warning in config.warnings:
            print(f"kmuxd: warning: {warning}", file=sys.stderr)
        return 0
    configure(args.log_format or config.daemon.log_format, config.daemon.log_level)
    log_missing_capabilities(config)
    from kmuxd.io.daemon import run

    try:
        run(config)
    except OSError as exc:
        print(f"kmuxd: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def check_report(config: Config) -> list[str]:
    """``--check``'s lines after "ok": capabilities needed (and held, under systemd), loose secret files."""
    from kmuxd.system.privileges import CapabilityReport

    return CapabilityReport.of(config.groups.values()).lines()


def log_missing_capabilities(config: Config) -> None:
    """One warning per capability the configuration needs and the process lacks (its dials will say so too)."""
    from kmuxd.system.log import get_logger
    from kmuxd.system.privileges import KernelNet, drop_in, effective_capabilities, needs

    found = needs(config.groups.values(), KernelNet.read())
    if not found:
        return
    held = effective_capabilities()
    for cap in sorted({n.capability for n in found} - held):
        keys = [n.key for n in found if n.capability == cap]
        get_logger().warning("capability_missing", capability=cap, keys=keys,
                             drop_in="; ".join(drop_in([cap]).splitlines()),
                             consequence="these groups fail their dials with permission_denied")


if __name__ == "__main__":
    sys.exit(main())
