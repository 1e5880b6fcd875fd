"""Generate the man pages kmuxd(8), kmux-cli(8) and kmuxd.toml(5) from their one source each.

    .venv/bin/python packaging/manpages.py           write kmuxd/share/man/*
    .venv/bin/python packaging/manpages.py --check   exit 1 (and say which) if a page is stale

Nothing in a page is written here twice: options and subcommands come from
the real argparse parsers (``kmuxd.main.build_parser``,
``kmuxd.system.install.build_parser``, ``kmuxd.cli.main.build_parser``), and
prose comes from the Markdown in ``docs/`` and ``README.md``, converted by
the small Markdown-to-roff converter below (headings, paragraphs, bullet
lists, fenced code, tables, inline code/bold/links: the subset docs/ uses).
The only text of its own is the short FILES and SEE ALSO lists.

The output is deterministic (no date in ``.TH``), so a test regenerates the
pages and compares them byte for byte (``tests/systemd/test_manpages.py``):
a change to a parser or to docs/ without ``packaging/manpages.py`` fails
the suite. The pages ship in the wheel as package data (``kmuxd/share/man``)
and are installed by ``kmuxd install-units`` and by the Debian package.

Why not argparse-manpage and pandoc: ``kmuxd install-units`` is not an
argparse subparser (the daemon's own command line stays flat), the pages mix
parsers with sections of docs/, and pandoc is a large Haskell install for
three pages. This converter is ~150 lines with no dependency.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "kmuxd" / "share" / "man"
#: Pages are wrapped by groff; a source line this long is only for readability of the .8/.5 files.
TITLE_MANUAL = {"8": "System Administration", "5": "File Formats"}


# -- roff primitives ------------------------------------------------------------------


def esc(text: str) -> str:
    """Plain text as roff: backslashes escaped, no line starting with a control character."""
    text = text.replace("\\", "\\e")
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in text.split("\n"))


def literal(text: str) -> str:
    """Text to be typed as is (options, paths, code): escaped, with real minus signs."""
    return esc(text).replace("-", "\\-")


def inline(md: str) -> str:
    """One paragraph's Markdown inline syntax to roff fonts."""
    out, pos = [], 0
    for m in re.finditer(r"`([^`]+)`|\*\*(.+?)\*\*|\[([^\]]+)\]\(([^)]+)\)", md):
        out.append(esc(md[pos:m.start()]))
        if m.group(1) is not None:
            out.append(f"\\fB{literal(m.group(1))}\\fR")
        elif m.group(2) is not None:
            out.append(f"\\fB{inline(m.group(2))}\\fR")
        else:
            out.append(inline(m.group(3)))  # links: the text only (targets are repo-relative)
        pos = m.end()
    out.append(esc(md[pos:]))
    return "".join(out)


def heading(level: int, text: str) -> str:
    """.SH in capitals (but not what is in backticks: ``-j`` stays an option) or .SS."""
    parts = text.replace('"', "").split("`")
    if level <= 2:
        return '.SH "' + "".join(p if i % 2 else p.upper() for i, p in enumerate(parts)) + '"'
    return '.SS "' + "".join(parts) + '"'


def th(name: str, section: str, version: str) -> str:
    return f'.TH "{name.upper()}" "{section}" "" "kmuxd {version}" "{TITLE_MANUAL[section]}"'


# -- Markdown blocks ----------------------------------------------------------------------


def _cells(row: str) -> list[str]:
    # Split on | outside backticks (a cell may hold `a | b`).
    cells, cur, code = [], [], False
    for ch in row.strip().strip("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    cells.append("".join(cur).strip())
    return cells


def table(rows: list[str]) -> list[str]:
    """A Markdown table as tagged paragraphs: the first cell is the tag, then the
    "meaning" cell, then every other cell on its own line as "Header: cell"."""
    header = _cells(rows[0])
    out = []
    for row in rows[2:]:
        cells = dict(zip(header, _cells(row)))
        out += [".TP", inline(cells.pop(header[0]))]
        prose = [inline(cells.pop(h)) for h in ("meaning", "what it is") if cells.get(h)]
        # "default" reads "Default:"; a header such as "kmux-cli" stays as written.
        rest = [f"{inline(h.capitalize() if h.isalpha() else h)}: {inline(c)}" for h, c in cells.items() if c]
        out += [". ".join(prose)] if prose else []
        for i, line in enumerate(rest):
            out += [".br", line] if prose or i else [line]
    return out


def markdown(md: str, *, shift: int = 0) -> list[str]:
    """Markdown blocks to roff lines; ``shift`` demotes headings (a doc's ## becomes a .SS)."""
    lines = md.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out += [".PP", ".RS 4", ".nf", *(literal(ln) for ln in lines[i + 1:j]), ".fi", ".RE"]
            i = j + 1
        elif m := re.match(r"(#+) (.*)", line):
            out.append(heading(len(m.group(1)) + shift, m.group(2)))
            i += 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out += table(lines[i:j])
            i = j
        elif line.startswith("* "):
            item = [line[2:]]
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():
                item.append(lines[i].strip())
                i += 1
            out += [".IP \\(bu 2", inline(" ".join(item))]
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("```", "#", "|", "* ")):
                para.append(lines[i].strip())
                i += 1
            out += [".PP", inline(" ".join(para))]
    return out


def sections(md: str) -> dict[str, str]:
    """A Markdown document split at its ## headings: {"": text before the first, title: body}."""
    parts = re.split(r"^## (.*)$", md, flags=re.M)
    found = {"": parts[0].split("\n", 1)[1] if parts[0].startswith("# ") else parts[0]}
    for title, body in zip(parts[1::2], parts[2::2]):
        found[title.strip()] = body
    return found


# -- argparse ---------------------------------------------------------------------------------


def _flags(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{literal(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (f"{{{','.join(action.choices)}}}" if action.choices else action.dest.upper())
    if action.nargs == "?":  # an optional value: "--watch 2" and "--watch=2" both work (docs/cli.md)
        return f"{names} [\\fI{literal(metavar)}\\fR]"
    return f"{names} \\fI{literal(metavar)}\\fR"


def _positional(action: argparse.Action) -> str:
    word = f"\\fI{literal(action.metavar or action.dest)}\\fR"
    return f"[{word}]" if action.nargs == "?" else word


def options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("-h",)) -> list[str]:
    out = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or set(action.option_strings) & set(skip):
            continue
        out += [".TP", _flags(action), esc(action.help or "")]
    return out


def usage(parser: argparse.ArgumentParser) -> str:
    text = " ".join(parser.format_usage().split()[1:])
    return literal(text)


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


# -- the pages --------------------------------------------------------------------------------


def _version() -> str:
    from kmuxd import __version__

    return __version__


def page_kmuxd() -> str:
    from kmuxd.main import DEFAULT_CONFIG, build_parser
    from kmuxd.system import credentials, install

    parser = build_parser()
    readme = sections((REPO / "README.md").read_text())
    systemd = sections((REPO / "docs" / "systemd.md").read_text())
    out = [th("kmuxd", "8", _version()), ".SH NAME", f"kmuxd \\- {esc(parser.description)}", ".SH SYNOPSIS"]
    handshake = credentials.build_parser()
    for command in ("", "install-units", "uninstall-units"):
        p = install.build_parser(command) if command else parser
        out += [".PP", usage(p)]
    for _, sub in subcommands(handshake):
        out += [".PP", usage(sub)]
    out += [".SH DESCRIPTION", *markdown(readme[""]), ".SH OPTIONS", *options(parser)]
    for command in ("install-units", "uninstall-units"):
        p = install.build_parser(command)
        out += [f'.SH "{command.upper()}"', ".PP", esc(p.description) + ".", *options(p)]
    out += ['.SH "HANDSHAKE"', ".PP", esc(handshake.description) + " (docs/systemd.md, Credentials)."]
    for name, sub in subcommands(handshake):
        out += [".TP", f"\\fB{literal(name)}\\fR", esc(sub.description or "")]
        out += [line for action in sub._actions if action.option_strings and action.help != argparse.SUPPRESS
                and "-h" not in action.option_strings
                for line in (".RS", ".TP", _flags(action), esc(action.help or ""), ".RE")]
    out += [".SH SYSTEMD", *markdown(systemd["How the pieces fit"], shift=1),
            heading(3, "Privileges"), *markdown(systemd["Privileges"], shift=1),
            heading(3, "Credentials"), *markdown(systemd["Credentials"], shift=1),
            ".SH FILES",
            ".TP", literal(DEFAULT_CONFIG), "the configuration, kmuxd.toml(5)",
            ".TP", literal("/run/kmuxd/kmuxd.sock"), "the apps' socket (group kmux)",
            ".TP", literal("/run/kmuxd/control.sock"), "the control socket for kmux\\-cli(8), root only",
            ".TP", literal(f"/{install.PACKAGE_UNIT_DIR}/kmuxd.service"),
            f"the units from the Debian package; \\fBkmuxd install\\-units\\fR writes them to {literal('/' + install.UNIT_DIR)}",
            ".SH \"SEE ALSO\"",
            "kmux\\-cli(8), kmuxd.toml(5), systemd.socket(5), sysusers.d(5), journalctl(1)"]
    return "\n".join(out) + "\n"


def page_cli() -> str:
    from kmuxd.cli.main import build_parser

    parser = build_parser()
    doc = sections((REPO / "docs" / "cli.md").read_text())
    out = [th("kmux-cli", "8", _version()), ".SH NAME", f"kmux\\-cli \\- {esc(parser.description)}",
           ".SH SYNOPSIS", ".PP", usage(parser), ".SH DESCRIPTION", *markdown(doc[""]),
           ".SH OPTIONS", *options(parser), ".SH COMMANDS"]
    for name, sub in subcommands(parser):
        words = [literal(name)] + [_positional(a) for a in sub._actions if not a.option_strings]
        top = {o for a in parser._actions for o in a.option_strings}
        own = [a for a in sub._actions if a.option_strings and not set(a.option_strings) & top]
        out += [".TP", " ".join(words), esc(sub.description or "")]
        for action in own:
            out += [".RS", ".TP", _flags(action), esc(action.help or ""), ".RE"]
    # Every section of docs/cli.md but the options (the parser has them) and the Python API.
    for title, body in list(doc.items())[1:]:
        if title not in CLI_SECTIONS_SKIPPED:
            out += [heading(2, CLI_SECTION_TITLES.get(title, title)), *markdown(body, shift=1)]
    out += [
            ".SH ENVIRONMENT", ".TP", "\\fBKMUX_CONTROL\\fR", "the control socket when \\fB\\-\\-control\\fR is not given",
            ".SH \"SEE ALSO\"", "kmuxd(8), kmuxd.toml(5)"]
    return "\n".join(out) + "\n"


def page_config() -> str:
    doc = (REPO / "docs" / "config.md").read_text()
    parts = sections(doc)
    out = [th("kmuxd.toml", "5", _version()), ".SH NAME", "kmuxd.toml \\- configuration of kmuxd(8)",
           ".SH SYNOPSIS", ".PP", literal("/etc/kmuxd/kmuxd.toml"), ".SH DESCRIPTION", *markdown(parts[""])]
    for title, body in list(parts.items())[1:]:
        out += [heading(2, title), *markdown(body, shift=1)]
    out += [".SH \"SEE ALSO\"", "kmuxd(8), kmux\\-cli(8)"]
    return "\n".join(out) + "\n"


#: docs/cli.md sections kmux-cli(8) leaves out, and the ones it renames to man(7) conventions.
CLI_SECTIONS_SKIPPED = ("Options", "As a library")
CLI_SECTION_TITLES = {"Exit codes": "Exit status"}

PAGES = {"kmuxd.8": page_kmuxd, "kmux-cli.8": page_cli, "kmuxd.toml.5": page_config}


def render() -> dict[str, str]:
    return {name: build() for name, build in PAGES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="generate the man pages into kmuxd/share/man")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if any page is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(name)
        if not args.check:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print(f"stale man pages: {', '.join(stale)}; run: python packaging/manpages.py", file=sys.stderr)
        return 1
    print(f"man pages: {'up to date' if not stale else 'wrote ' + ', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
