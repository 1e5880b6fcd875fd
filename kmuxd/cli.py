"""``kmuxd``: run the daemon in the foreground, or only check a configuration."""

from __future__ import annotations

import argparse
import sys

from kmux.errors import ConfigInvalid

from . import __version__
from .config import load_config
from .log import configure

DEFAULT_CONFIG = "/etc/kmuxd/kmuxd.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kmuxd", description="message multiplexer over shared TCP connection groups")
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"TOML configuration (default {DEFAULT_CONFIG})")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit (0 = valid)")
    parser.add_argument("--log-format", choices=("auto", "console", "json", "journal"), help="override daemon.log_format")
    parser.add_argument("--version", action="version", version=f"kmuxd {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigInvalid as exc:
        print(f"kmuxd: invalid configuration: {exc.message}", file=sys.stderr)
        return 1
    if args.check:
        print(f"kmuxd: {args.config}: ok ({len(config.groups)} group(s): {', '.join(config.groups)})")
        return 0
    configure(args.log_format or config.daemon.log_format, config.daemon.log_level)
    from .daemon import run

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
