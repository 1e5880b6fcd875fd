"""``kmuxd install-units`` / ``kmuxd uninstall-units``: put the systemd units in place, or take them away.

What install writes (under ``--prefix``, default ``/``):

* ``etc/systemd/system/kmuxd.service``, ``kmuxd.socket`` and
  ``kmuxd-control.socket``, rendered from ``packaging/systemd/`` so that
  ExecStartPre=, ExecStart= and ExecReload= run *this* kmuxd (the shipped
  files say ``/usr/local/bin/kmuxd``) with ``CONFIG_DIR/kmuxd.toml``;
* ``etc/sysusers.d/kmuxd.conf``, which declares the ``kmux`` group that owns
  the apps' socket;
* ``CONFIG_DIR/kmuxd.toml`` from ``packaging/kmuxd.toml``, only if there is
  no configuration yet (a user's file is never overwritten).

Every file install writes starts with :data:`MARKER`. Uninstall removes a
file only if it carries the marker, so a unit the administrator or a
distribution package put there is never deleted, and install refuses to
overwrite one (unless ``--force``). The configuration is kept unless
``--purge``; the ``kmux`` group is always kept (files may still be owned by
it, and sysusers.d never removes groups either).

With ``--prefix /`` and a running systemd, install then runs
``systemd-sysusers`` and ``systemctl daemon-reload`` (and ``enable`` with
``--enable``, ``enable --now`` with ``--now``); uninstall stops and disables
the units first. With any other prefix (a DESTDIR for packaging, or a test)
nothing is run, and the output says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "render_units", "kmuxd_executable", "MARKER", "UNITS"]

#: First line of every file install-units writes; uninstall-units removes only files that carry it.
MARKER = "# Installed by `kmuxd install-units`; `kmuxd uninstall-units` removes this file."
#: Unit files in packaging/systemd/, in the order systemctl is given them.
UNITS = ("kmuxd.socket", "kmuxd-control.socket", "kmuxd.service")
SYSUSERS_NAME = "kmuxd.conf"
CONFIG_NAME = "kmuxd.toml"
DEFAULT_CONFIG_DIR = "/etc/kmuxd"
#: Paths in the shipped unit files that install-units replaces.
SHIPPED_KMUXD = "/usr/local/bin/kmuxd"
SHIPPED_CONFIG = "/etc/kmuxd/kmuxd.toml"
SHIPPED_DOCS = "file:///usr/share/doc/kmuxd/"
UNIT_DIR = "etc/systemd/system"
SYSUSERS_DIR = "etc/sysusers.d"
#: ProtectHome=yes hides these trees from the service; if kmuxd or its Python
#: lives there, the unit gets ProtectHome=tmpfs plus BindReadOnlyPaths= of those trees.
HOME_TREES = ("/home", "/root", "/run/user")
#: PrivateTmp=yes gives the service its own empty /tmp and /var/tmp.
TMP_TREES = ("/tmp", "/var/tmp")
#: Seconds any systemctl/systemd-sysusers call may take.
COMMAND_TIMEOUT = 60


class InstallError(Exception):
    """Something the user must fix; the message says what."""


@dataclass(frozen=True, slots=True)
class Rendered:
    #: Absolute destination, prefix included.
    path: Path
    text: str


def packaging_dir() -> Path:
    """``packaging/`` of the source tree this kmuxd runs from."""
    here = Path(__file__).resolve().parents[2] / "packaging"
    if not (here / "systemd" / "kmuxd.service").is_file():
        raise InstallError(
            f"the unit templates are not at {here}/systemd; run install-units from a source checkout "
            "(pip install -e) or copy packaging/systemd/ by hand (docs/systemd.md)"
        )
    return here


def kmuxd_executable() -> str:
    """Absolute path of the ``kmuxd`` command that is running now.

    ``sys.argv[0]`` when it is the console script; with ``python -m kmuxd``
    the script beside the interpreter (a venv's bin/), else ``$PATH``.
    """
    candidates = [sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "kmuxd" else None,
                  str(Path(sys.executable).parent / "kmuxd"), shutil.which("kmuxd")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise InstallError("cannot find the kmuxd executable; pass --kmuxd PATH")


def _under(path: str, trees: tuple[str, ...]) -> bool:
    return any(path == t or path.startswith(t + "/") for t in trees)


def _code_paths(exe: str) -> list[str]:
    """What the service must read to start: the script, the interpreter's tree, the venv, the sources."""
    import kmux

    from kmuxd import __file__ as kmuxd_init

    paths = [exe, os.path.realpath(exe), os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
             str(Path(kmuxd_init).resolve().parent), str(Path(kmux.__file__).resolve().parent)]
    return list(dict.fromkeys(paths))


def _outermost(paths: list[str]) -> list[str]:
    """The paths that are not inside another one of them, sorted."""
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(_under(p, (q,)) for q in out):
            out.append(p)
    return sorted(out)


def render_units(kmuxd: str, config_dir: str, prefix: Path, *, code_paths: list[str] | None = None,
                 notes: list[str] | None = None) -> list[Rendered]:
    """The unit and sysusers files with this installation's paths filled in."""
    for what, value in (("kmuxd", kmuxd), ("config directory", config_dir)):
        if not os.path.isabs(value) or any(ch.isspace() or ch in "\"'\\$%;" for ch in value):
            raise InstallError(f"the {what} path {value!r} must be absolute, without spaces, quotes, $, % or ;")
    code_paths = code_paths if code_paths is not None else [kmuxd]
    notes = notes if notes is not None else []
    src = packaging_dir()
    config = config_dir.rstrip("/") + "/" + CONFIG_NAME
    docs = Path(__file__).resolve().parents[2] / "docs"
    out = []
    for name in UNITS:
        text = (src / "systemd" / name).read_text()
        text = text.replace(SHIPPED_KMUXD, kmuxd).replace(SHIPPED_CONFIG, config)
        if docs.is_dir():
            text = text.replace(SHIPPED_DOCS, f"file://{docs}/")
        if name == "kmuxd.service":
            text = _adjust_service(text, config_dir, code_paths, notes)
        out.append(Rendered(prefix / UNIT_DIR / name, f"{MARKER}\n{text}"))
    sysusers = (src / "sysusers.d" / SYSUSERS_NAME).read_text()
    out.append(Rendered(prefix / SYSUSERS_DIR / SYSUSERS_NAME, f"{MARKER}\n{sysusers}"))
    return out


def _adjust_service(text: str, config_dir: str, code_paths: list[str], notes: list[str]) -> str:
    lines = text.splitlines()
    if _under(config_dir.rstrip("/"), ("/etc",)) and config_dir.rstrip("/") != "/etc":
        rel = config_dir.rstrip("/")[len("/etc/"):]
        lines = [f"ConfigurationDirectory={rel}" if ln.startswith("ConfigurationDirectory=") else ln for ln in lines]
    else:
        # ConfigurationDirectory= only names directories under /etc.
        lines = [ln for ln in lines if not ln.startswith("ConfigurationDirectory")]
        notes.append(f"{config_dir} is not under /etc: ConfigurationDirectory= dropped; the directory must exist")
    in_home = _outermost([p for p in code_paths + [config_dir] if _under(p, HOME_TREES)])
    if in_home:
        # Empty home directories, except the trees kmuxd needs, read-only.
        binds = " ".join(in_home)
        i = lines.index("ProtectHome=yes")
        lines[i:i + 1] = ["ProtectHome=tmpfs", f"BindReadOnlyPaths={binds}"]
        notes.append(f"kmuxd (or its Python) lives under {' or '.join(HOME_TREES)}: the unit says ProtectHome=tmpfs "
                     f"with BindReadOnlyPaths={binds} (installing under /opt or /usr/local avoids this)")
    in_tmp = _outermost([p for p in code_paths + [config_dir] if _under(p, TMP_TREES)])
    if in_tmp:
        # PrivateTmp= gives the service an empty /tmp; bind just these trees
        # into it, read-only (systemd mounts them over the private /tmp).
        binds = " ".join(in_tmp)
        i = lines.index("PrivateTmp=yes")
        lines.insert(i + 1, f"BindReadOnlyPaths={binds}")
        notes.append(f"kmuxd (or its configuration) lives under {' or '.join(TMP_TREES)}: the unit binds {binds} "
                     "read-only into the service's private /tmp (installing under /opt or /usr/local avoids this)")
    return "\n".join(lines) + "\n"


# -- running things -------------------------------------------------------------


def systemd_running() -> bool:
    """sd_booted(): the test systemd itself uses."""
    return os.path.isdir("/run/systemd/system")


def _run(cmd: list[str], say) -> bool:
    say(f"  $ {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"    failed: {exc}")
        return False
    for line in (proc.stdout + proc.stderr).splitlines():
        say(f"    {line}")
    if proc.returncode != 0:
        say(f"    exit status {proc.returncode}")
    return proc.returncode == 0


def _ours(path: Path) -> bool:
    try:
        with path.open() as f:
            return f.readline().rstrip("\n") == MARKER
    except (OSError, UnicodeDecodeError):
        return False


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.kmuxd-tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# -- commands ---------------------------------------------------------------------


def install(args: argparse.Namespace, say=print) -> int:
    prefix = Path(args.prefix)
    live = prefix.resolve() == Path("/")
    exe = args.kmuxd or kmuxd_executable()
    notes: list[str] = []
    files = render_units(exe, args.config_dir, prefix, code_paths=_code_paths(exe), notes=notes)
    for f in files:
        if f.path.exists() and not _ours(f.path) and not args.force:
            raise InstallError(f"{f.path} exists and was not written by install-units; "
                               "move it away or pass --force to replace it")
    say(f"kmuxd install-units: ExecStart={exe} --config {args.config_dir.rstrip('/')}/{CONFIG_NAME}")
    for f in files:
        _write(f.path, f.text, 0o644)
        say(f"  wrote {f.path}")
    config = prefix / args.config_dir.lstrip("/") / CONFIG_NAME
    if config.exists():
        say(f"  kept {config} (already there)")
    else:
        config.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(config.parent, 0o755)
        _write(config, (packaging_dir() / CONFIG_NAME).read_text(), 0o644)
        say(f"  wrote {config} (the example; edit its [groups] before starting)")
    for note in notes:
        say(f"  note: {note}")
    if not live:
        say(f"  prefix {prefix} is not /: not running systemd-sysusers or systemctl")
        return 0
    ok = True
    sysusers = shutil.which("systemd-sysusers")
    if sysusers:
        ok &= _run([sysusers, str(files[-1].path)], say)
    else:
        say("  systemd-sysusers not found: create the group yourself (groupadd --system kmux)")
    if not systemd_running():
        say("  systemd is not running here: skipped systemctl daemon-reload/enable")
        return 0 if ok else 1
    ok &= _run(["systemctl", "daemon-reload"], say)
    if args.enable or args.now:
        ok &= _run(["systemctl", "enable", *(["--now"] if args.now else []), *UNITS], say)
    else:
        say("  next: systemctl enable --now kmuxd.service  (also enables both sockets)")
    return 0 if ok else 1


def uninstall(args: argparse.Namespace, say=print) -> int:
    prefix = Path(args.prefix)
    live = prefix.resolve() == Path("/")
    unit_paths = [prefix / UNIT_DIR / name for name in UNITS]
    ok = True
    if live and systemd_running() and any(_ours(p) for p in unit_paths):
        ok &= _run(["systemctl", "disable", "--now", *UNITS], say)
    for path in unit_paths + [prefix / SYSUSERS_DIR / SYSUSERS_NAME]:
        if _ours(path):
            path.unlink()
            say(f"  removed {path}")
        elif path.exists():
            say(f"  kept {path}: not written by install-units")
    config = prefix / args.config_dir.lstrip("/") / CONFIG_NAME
    if config.exists():
        if args.purge:
            config.unlink()
            say(f"  removed {config} (--purge)")
            try:
                config.parent.rmdir()
                say(f"  removed {config.parent}")
            except OSError:
                pass  # not empty: someone else's files
        else:
            say(f"  kept {config} (--purge removes it)")
    say("  kept the kmux group (groupdel kmux removes it)")
    if live and systemd_running():
        ok &= _run(["systemctl", "daemon-reload"], say)
    elif not live:
        say(f"  prefix {prefix} is not /: not running systemctl")
    return 0 if ok else 1


def main(command: str, argv: list[str]) -> int:
    """``kmuxd install-units|uninstall-units [options]``."""
    parser = argparse.ArgumentParser(prog=f"kmuxd {command}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="/", help="install root, a DESTDIR (default /; "
                        "any other root only writes files)")
    parser.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR,
                        help=f"directory of kmuxd.toml as the service sees it (default {DEFAULT_CONFIG_DIR})")
    if command == "install-units":
        parser.add_argument("--kmuxd", help="the kmuxd executable the units run (default: this one)")
        parser.add_argument("--force", action="store_true", help="replace unit files install-units did not write")
        parser.add_argument("--enable", action="store_true", help="systemctl enable the units")
        parser.add_argument("--now", action="store_true", help="systemctl enable --now the units")
    else:
        parser.add_argument("--purge", action="store_true", help="also remove CONFIG_DIR/kmuxd.toml")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 and Path(args.prefix).resolve() == Path("/"):
        print(f"kmuxd {command}: must run as root to write under / (or pass --prefix DIR)", file=sys.stderr)
        return 1
    try:
        return install(args) if command == "install-units" else uninstall(args)
    except (InstallError, OSError) as exc:
        print(f"kmuxd {command}: {exc}", file=sys.stderr)
        return 1
