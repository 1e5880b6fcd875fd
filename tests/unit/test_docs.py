"""The docs and man pages agree with the code where a machine can tell: keys, option forms, examples.

Checked against the real parsers and tables, not against copies:

* docs/config.md documents exactly the keys the configuration parser takes
  (``[daemon]``, ``[groups.NAME]``, ``[groups.NAME.id]``);
* every TOML example in README.md and docs/ is a configuration the parser
  accepts (user and group names that do not exist on this machine aside);
* every ``kmux-cli ...`` and ``kmuxd ...`` command line in a code block
  parses with the real argparse parser, and every option docs/cli.md lists
  works in each form it is written in (``--watch 2`` and ``--watch=2``);
* the journal's MESSAGE_IDs are documented with their values;
* no man page sends its reader to a source file.

What needs a running daemon (log fields, record keys) is in
``tests/integration/test_docs.py``.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from kmux.errors import ConfigInvalid
from kmuxd.cli.main import build_parser as cli_parser
from kmuxd.cli.main import parse_args as cli_parse_args
from kmuxd.main import UNIT_COMMANDS
from kmuxd.main import build_parser as kmuxd_parser
from kmuxd.system import config, install
from kmuxd.system.log import MESSAGE_IDS

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAN = sorted((ROOT / "kmuxd" / "share" / "man").iterdir())
#: Programs whose command lines in the docs are parsed here.
PROGRAMS = ("kmux-cli", "kmuxd")
#: Where a command line ends (shell syntax after the program's arguments).
SHELL_ENDS = {"|", "&&", "||", ";", "&", ">", ">>", "2>&1", "2>/dev/null"}


def blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S)


def command_lines() -> list[tuple[str, str, list[str]]]:
    """``(file, program, args)`` of each command line in the docs' code blocks.

    A command line is a ``$ `` line of any block, or any line of an ``sh``
    block; the program may follow ``sudo``, a wrapper (``setpriv ...``) or
    cron's user field, and may be a path (``.venv/bin/kmux-cli``).
    Synopses (``[OPTIONS]``) are not command lines.
    """
    found = []
    for path in DOCS:
        for lang, text in blocks(path):
            for line in text.splitlines():
                if line.startswith("$ "):
                    line = line[2:]
                elif lang != "sh":
                    if not re.match(r"^(\* ){5}root ", line):
                        continue
                if "[OPTIONS]" in line:
                    continue
                words = shlex.split(line, comments=True)
                at = next((i for i, w in enumerate(words) if w.rsplit("/", 1)[-1] in PROGRAMS), None)
                if at is None or (at and words[at - 1] not in ("sudo", "root") and words[0] not in ("setpriv", "sudo")):
                    continue  # `systemctl start kmuxd`: kmuxd is a unit's name there
                args = []
                for word in words[at + 1:]:
                    if word in SHELL_ENDS:
                        break
                    args.append(word)
                found.append((path.name, words[at].rsplit("/", 1)[-1], args))
    return found


def parses(program: str, args: list[str]) -> bool:
    try:
        if program == "kmux-cli":
            cli_parse_args(args)
        elif args and args[0] in UNIT_COMMANDS:
            install.build_parser(args[0]).parse_args(args[1:])
        else:
            kmuxd_parser().parse_args(args)
    except SystemExit as exc:
        return exc.code == 0  # --version, --help: printed, and a clean exit
    return True


def test_the_docs_have_command_lines_of_both_programs():
    """The extraction below must keep finding what it checks."""
    programs = {program for _, program, _ in command_lines()}
    assert programs == set(PROGRAMS)
    assert len(command_lines()) >= 15


@pytest.mark.parametrize("where, program, args", command_lines(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_command_line_in_the_docs_parses(where, program, args, capsys):
    assert parses(program, args), f"{where}: `{program} {' '.join(args)}`: {capsys.readouterr().err}"


def documented_cli_options() -> list[tuple[str, str | None, bool]]:
    """docs/cli.md's Options table: ``(option, metavar or None, after the command too)`` for
    every spelling of each row ("Every command takes these, before or after the command name",
    unless the row says "before the command name only")."""
    body = (ROOT / "docs" / "cli.md").read_text().split("## Options\n", 1)[1].split("\n## ", 1)[0]
    assert "before or after the command name" in body
    out = []
    for row in re.findall(r"^\| `-.*$", body, re.M):
        cell, meaning = row.strip("|").split(" | ", 1)
        for form in re.findall(r"`([^`]+)`", cell):
            m = re.fullmatch(r"(-[-\w]+)(?: \[?([A-Z]+)\]?)?", form)
            assert m, f"docs/cli.md: cannot read the option form {form!r}"
            out.append((m.group(1), m.group(2), "before the command name only" not in meaning))
    return out


#: A value for each metavar docs/cli.md uses.
SAMPLE = {"SECONDS": "2", "N": "3", "PATH": "/run/kmuxd/control.sock"}


def test_options_table_lists_exactly_the_cli_options():
    parser = cli_parser()
    real = {o for a in parser._actions for o in a.option_strings if a.help != "==SUPPRESS=="} - {"-h", "--help"}
    documented = {option for option, _, _ in documented_cli_options()}
    assert documented == real, f"docs/cli.md Options: missing {sorted(real - documented)}, extra {sorted(documented - real)}"


@pytest.mark.parametrize("option, metavar, after", documented_cli_options())
def test_every_documented_option_form_works(option, metavar, after, capsys):
    """``--opt VALUE`` and ``--opt=VALUE`` for options with a value (``--watch`` also bare),
    before the command name and, unless the table says otherwise, after it."""
    forms = [[option]] if metavar is None else [[option, SAMPLE[metavar]], [f"{option}={SAMPLE[metavar]}"]]
    if option == "--watch":
        forms.append([option])
    needs = ["--watch"] if option == "--count" else []
    for form in forms:
        for args in ([*needs, *form, "groups"], *([["groups", *needs, *form]] if after else [])):
            assert parses("kmux-cli", args), f"kmux-cli {' '.join(args)}: {capsys.readouterr().err}"


def test_the_man_page_shows_the_watch_interval_as_optional_in_both_forms():
    """Not ``--watch=SECONDS`` only: ``--watch 2`` works too (the parser's help says so)."""
    page = (ROOT / "kmuxd" / "share" / "man" / "kmux-cli.8").read_text()
    assert "\\fB\\-\\-watch\\fR [\\fISECONDS\\fR]" in page
    assert "--watch 2 or --watch=2" in page.replace("\\-", "-")


# -- configuration keys ---------------------------------------------------------------------


def table_keys(doc: str, heading: str) -> set[str]:
    body = doc.split(f"## {heading}\n", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", body, re.M))


def test_config_docs_list_exactly_the_keys_the_parser_takes():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert table_keys(doc, "`[daemon]`") == set(config.DaemonConfig.__dataclass_fields__)
    group_rows = table_keys(doc, "`[groups.NAME]`")
    # A key whose value is a table has a section of its own (### `[groups.NAME.id]`) instead of a row.
    tables = set(re.findall(r"^### `\[groups\.NAME\.([a-z_]+)\]`", doc, re.M))
    assert group_rows | tables == config._GROUP_KEYS, (
        f"docs/config.md [groups.NAME]: missing {sorted(config._GROUP_KEYS - group_rows - tables)}, "
        f"not keys {sorted(group_rows - config._GROUP_KEYS)}")
    id_example = doc.split("### `[groups.NAME.id]`", 1)[1]
    (toml_text,) = re.findall(r"^```toml\n(.*?)^```", id_example, re.M | re.S)[:1]
    (table,) = tomllib.loads(toml_text)["groups"].values()
    assert set(table["id"]) == set(config.IdConfig.__dataclass_fields__)


#: Problems of a configuration that only say this machine is not the one the docs describe.
ELSEWHERE = (r"no such (user|group) '.*' on this system|^/\S+ does not exist$"
             r"|looked up in \$CREDENTIALS_DIRECTORY, which is not set"
             r"|is a credential name, but \$CREDENTIALS_DIRECTORY is not set")


def toml_examples() -> list[tuple[str, str]]:
    return [(path.name, text) for path in DOCS for lang, text in blocks(path) if lang == "toml"]


def as_config(text: str) -> list[dict]:
    """A TOML example as whole configurations: a full file as it is, a group's table with
    ``endpoints`` filled in, and bare ``key = value`` lines each in a group of their own."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError:  # several alternatives for one key, one per line
        return [c for line in text.splitlines() if line.strip() and not line.startswith("#") for c in as_config(line)]
    if "version" in raw:
        return [raw]
    if "groups" not in raw:
        raw = {"groups": {"g": raw}}
    for group in raw["groups"].values():
        group.setdefault("endpoints", ["127.0.0.1:7000"])
        if "id" in group:
            group.setdefault("steering", "id")
    return [{"version": 1, **raw}]


@pytest.mark.parametrize("where, text", toml_examples(), ids=lambda v: v if v.endswith(".md") else v.split("\n")[0][:40])
def test_every_toml_example_is_a_valid_configuration(where, text):
    for raw in as_config(text):
        try:
            config.parse_config(raw)
        except ConfigInvalid as exc:
            # The docs' users, groups, key files and credentials need not exist on this machine;
            # nothing else may fail.
            others = [p for p in exc.problems if not re.search(ELSEWHERE, p[1])]
            assert not others, f"{where}: {others}"


# -- the journal, and the man pages' references ---------------------------------------------


def test_every_message_id_is_documented_with_its_value():
    doc = (ROOT / "docs" / "systemd.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([0-9a-f]{32})` \|", doc, re.M))
    assert rows == MESSAGE_IDS


@pytest.mark.parametrize("page", MAN, ids=lambda p: p.name)
def test_no_man_page_points_at_a_source_file(page):
    text = page.read_text().replace("\\-", "-")
    assert not re.findall(r"[\w/]+\.py\b", text), "a man page's reader has no source tree"
