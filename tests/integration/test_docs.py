"""The docs' examples of records and log lines match what a real daemon sends and logs.

README.md and docs/*.md show log lines (journal, console and JSON) and
document every key of the control socket's records (docs/cli.md, "JSON").
Both drift when the code changes and nobody rereads the prose; here a real
kmuxd serves a group, an app attaches, receives, leaves, and another app
draws a socket error, and then:

* every documented key of a record is a key the daemon sends, and every
  key it sends is documented (a new field fails until docs/cli.md has it);
* every log line in the docs names an event the daemon logs, with fields
  it logs for that event (a field the code no longer logs, or never did,
  fails: the README's ``comm=`` on ``client_attached`` was one);
* the journal fields an example shows (``GROUP=``, ``CLIENT_ID=``, ...) are
  the ones :class:`kmuxd.system.log.JournalRenderer` makes of that event.

The static checks (config keys, option forms, TOML examples, message ids)
are in ``tests/unit/test_docs.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

import structlog
from kmux.control import ControlClient

from kmuxd.system.log import JournalRenderer

from .helpers import Backend, Daemon, RawApp, frame_packet, group_config, group_record, make_frame, wait_until, write_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: docs/cli.md's record tables, by heading, and where each record is in a ``stats`` answer.
RECORD_TABLES = {"Daemon record": "daemon", "Group record": "group", "Connection record": "connection",
                 "Client record": "client", "Control record": "control"}


def code_lines(path: Path) -> list[str]:
    """Every line of every fenced code block of a Markdown file."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", path.read_text(), re.M | re.S)
    return [line for block in blocks for line in block.splitlines()]


def documented_log_lines() -> list[tuple[str, str, str, set[str]]]:
    """``(file, form, event, fields)`` of each log line the docs show (journal, console, JSON)."""
    found = []
    for path in DOCS:
        for line in code_lines(path):
            text = line.strip()
            if text.startswith("{"):
                try:
                    entry = json.loads(text)
                except ValueError:
                    continue  # a protocol map with "..." in it, not a log line
                if {"event", "level", "timestamp"} <= entry.keys():  # a log line, not a protocol map
                    found.append((path.name, "json", entry["event"], set(entry) - {"event", "level", "timestamp"}))
            elif m := re.search(r"\[(?:debug|info|warning|error) *\] (\w+) +(.*)$", text):
                found.append((path.name, "console", m.group(1), set(re.findall(r"(\w+)=", m.group(2)))))
            elif m := re.search(r"(?:kmuxd\[\d+\]: |^MESSAGE=)(\w+) (\w+=.*)$", text):
                found.append((path.name, "journal", m.group(1), set(re.findall(r"(\w+)=", m.group(2)))))
    return found


def documented_journal_fields() -> dict[str, set[str]]:
    """``-o verbose`` examples: event -> the upper-case fields shown for it (``GROUP=``, ...)."""
    out: dict[str, set[str]] = {}
    for path in DOCS:
        for block in re.findall(r"^```\w*\n(.*?)^```", path.read_text(), re.M | re.S):
            event = re.search(r"^\s+KMUX_EVENT=(\w+)$", block, re.M)
            if event:
                out.setdefault(event.group(1), set()).update(re.findall(r"^\s+([A-Z_]+)=", block, re.M))
    return out


def documented_record_keys() -> dict[str, set[str]]:
    """docs/cli.md's record tables: record -> keys (``a``, ``b`` rows split; ``tcp.x`` nested)."""
    doc = (ROOT / "docs" / "cli.md").read_text()
    out = {}
    for heading, record in RECORD_TABLES.items():
        body = doc.split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
        keys = set()
        for row in re.findall(r"^\| (`.*?) \|", body, re.M):
            keys.update(re.findall(r"`([a-z_.0-9]+)`", row.split(" | ")[0]))
        out[record] = keys
    return out


def record_keys(record: dict[str, Any], nested: tuple[str, ...] = ()) -> set[str]:
    keys = set(record)
    for name in nested:
        if isinstance(record.get(name), dict):
            keys |= {f"{name}.{k}" for k in record[name]}
    return keys


@pytest.fixture(scope="module")
def served():
    """A daemon that logged every event the docs show, and its stats while a client was attached."""
    sock_dir = Path(tempfile.mkdtemp(prefix="kmx-", dir="/tmp"))
    backend = Backend(echo=True)
    settings = {"socket": str(sock_dir / "kmuxd.sock"), "log_format": "json", "log_level": "debug"}
    groups = {"echo": group_config(backend, connections=2),
              "rr": group_config(backend, connections=1, steering="fifo")}
    daemon = Daemon(write_config(sock_dir / "kmuxd.toml", settings, groups), settings["socket"], "echo")
    try:
        daemon.start()
        backend.wait_open(3)
        with daemon.connect(name="docs-demo") as c:
            for seq in range(1, 4):
                c.send(make_frame(1, seq, 100))
                c.recv(timeout=5.0)
            with ControlClient(daemon.control_socket) as ctl:
                answer = ctl.request("stats")
        # An app that shut its reading side: fifo responses to it fail with EPIPE (client_socket_error).
        deaf = RawApp(daemon.socket_path, "rr", "deaf")
        deaf.sock.shutdown(socket.SHUT_RD)
        deaf.push(frame_packet(deaf.client_id, 200), limit=3)
        wait_until(lambda: group_record(daemon, "rr")["dropped_responses"] == 3, 10.0, "the deaf app's responses")
        deaf.close()
        daemon.wait_log("client_detached", count=2)
        yield daemon, answer
    finally:
        daemon.stop()
        backend.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def logged_fields(daemon) -> dict[str, set[str]]:
    """event -> every field the daemon logged with it (any value, None included)."""
    out: dict[str, set[str]] = {}
    for entry in daemon.logs():
        out.setdefault(entry["event"], set()).update(set(entry) - {"event", "level", "timestamp"})
    return out


def test_every_record_key_is_documented_and_every_documented_key_is_sent(served):
    _, answer = served
    group = answer["groups"][0]
    real = {
        "daemon": record_keys(answer["daemon"]),
        "group": record_keys(group),
        "connection": record_keys(group["connections"][0], nested=("tcp",)),
        "client": record_keys(answer["clients"][0]),
        "control": record_keys(answer["control"]),
    }
    documented = documented_record_keys()
    for record, keys in real.items():
        assert not keys - documented[record], f"docs/cli.md, {record} record: document {sorted(keys - documented[record])}"
        assert not documented[record] - keys, f"docs/cli.md, {record} record: not sent: {sorted(documented[record] - keys)}"


def test_every_log_line_in_the_docs_has_fields_the_daemon_logs(served):
    daemon, _ = served
    real = logged_fields(daemon)
    lines = documented_log_lines()
    assert {form for _, form, _, _ in lines} == {"json", "console", "journal"}, "the docs' log examples moved"
    for where, form, event, fields in lines:
        assert event in real, f"{where}: a {form} line of {event!r}, which this run did not log (add it here)"
        assert fields <= real[event], f"{where}: {event} lines have no {sorted(fields - real[event])}"
    # The README's client_attached names the app's process (comm), as the daemon logs it.
    attached = daemon.logs("client_attached", name="docs-demo")[0]
    assert attached["comm"] == Path("/proc/self/comm").read_text().strip()


def test_journal_examples_show_the_fields_the_journal_renderer_makes(served):
    daemon, _ = served
    sent: list[tuple[str, dict[str, str]]] = []
    renderer = JournalRenderer()
    renderer._send = lambda message, **fields: sent.append((message, fields))
    for event, shown in documented_journal_fields().items():
        (entry, *_) = daemon.logs(event)
        with pytest.raises(structlog.DropEvent):  # sent to the journal, nothing printed
            renderer(None, entry["level"], dict(entry))
        message, fields = sent[-1]
        made = set(fields) | {"MESSAGE"}
        assert shown - {"..."} <= made, f"{event}: the journal has no {sorted(shown - made)}"
        assert "None" not in message, message  # empty values are left out of the line
