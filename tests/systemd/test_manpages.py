"""The man pages: current with their sources, and rendered by man(1) with what they must say.

``packaging/manpages.py`` generates kmuxd(8) and kmux-cli(8) from the real
argparse parsers and kmuxd.toml(5) from docs/config.md; the pages are
committed (they ship in the wheel). A parser or doc changed without
regenerating fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from kmuxd.cli.main import build_parser as cli_parser

from .conftest import REPO

MAN = REPO / "kmuxd" / "share" / "man"
needs_man = pytest.mark.skipif(not (shutil.which("man") and shutil.which("groff")),
                               reason="man-db and groff are not installed (./dev.sh test installs them)")


def rendered(page: str) -> str:
    """What ``man -l`` shows, as plain text with single spaces (groff justifies lines with more)."""
    env = {k: v for k, v in os.environ.items() if k != "MAN_KEEP_FORMATTING"}
    proc = subprocess.run(["man", "-l", str(MAN / page)], capture_output=True, text=True, timeout=60,
                          env=dict(env, MANWIDTH="200", LC_ALL="C.UTF-8"))
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r".\x08", "", proc.stdout)  # overstrike bold, should man keep it
    return re.sub(r"(?<=\S) {2,}(?=\S)", " ", text)


def test_pages_are_generated_from_the_current_sources() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "packaging" / "manpages.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@needs_man
@pytest.mark.parametrize("page", ["kmuxd.8", "kmux-cli.8", "kmuxd.toml.5"])
def test_groff_has_no_warnings(page: str) -> None:
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / page)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


@needs_man
def test_kmuxd_8_has_options_and_the_unit_commands() -> None:
    text = rendered("kmuxd.8")
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "INSTALL-UNITS", "UNINSTALL-UNITS", "SYSTEMD",
                    "FILES", "SEE ALSO"):
        assert re.search(rf"^{heading}$", text, re.M), heading
    for option in ("--config", "--check", "--log-format", "--prefix", "--now", "--packaged", "--purge", "--man-dir"):
        assert option in text, option
    assert "kmuxd - message multiplexer over shared TCP connection groups" in text
    assert "systemctl reload kmuxd" in text  # docs/systemd.md's "How the pieces fit"


@needs_man
def test_kmux_cli_8_has_every_command() -> None:
    text = rendered("kmux-cli.8")
    commands = next(a for a in cli_parser()._actions if a.dest == "command").choices
    for name in commands:
        assert re.search(rf"^\s+{name}\b", text, re.M), name
    exit_status = text.split("\nEXIT STATUS\n", 1)[1]
    codes = re.findall(r"^\| (\d+) \|", (REPO / "docs" / "cli.md").read_text(), re.M)
    assert codes and all(re.search(rf"^\s+{code}\s", exit_status, re.M) for code in codes), codes
    assert "reconnect GROUP [CONN]" in text and "--drain-timeout SECONDS" in text


@needs_man
def test_kmuxd_toml_5_has_every_key_of_docs_config() -> None:
    text = rendered("kmuxd.toml.5")
    keys = re.findall(r"^\| `([a-z_]+)` \|", (REPO / "docs" / "config.md").read_text(), re.M)
    assert len(keys) > 30
    missing = [k for k in keys if not re.search(rf"^\s+{k}\b", text, re.M)]
    assert not missing, missing
    assert re.search(r"^\[daemon\]$", text, re.M) and "Default: 1024" in text
