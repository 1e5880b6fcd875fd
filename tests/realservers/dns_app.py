"""A DNS app in its own process, for the recycling tests (``python -m tests.realservers.dns_app``).

Arguments: ``SOCKET GROUP INDEX ROUNDS PIPELINE NAMES_JSON``. The app joins
GROUP, prints ``ready``, waits for a line on stdin (so that every app
starts together), then runs ROUNDS rounds: it sends PIPELINE queries at
once with ids ``1..PIPELINE`` (the same ids in every app: kmuxd's rewrite
keeps them apart), then reads one outcome per query: an answer, which must
carry the query's id and repeat its question (else it is a *mismatch*), or
a notice naming the query's seq (``connection_lost``, ``request_timeout``,
...). A query with no outcome within RECV_TIMEOUT is a *timeout*. It
never asks again. It prints one JSON line of counts and exits.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import kmux
from kmux.errors import KmuxError

from . import dns_parse, dns_query, dns_question

#: Seconds an app waits for any outcome before it counts its open queries as timeouts.
RECV_TIMEOUT = 8.0


def run(path: str, group: str, index: int, rounds: int, pipeline: int, names: list[str]) -> dict:
    counts: Counter = Counter()
    problems: list[str] = []
    with kmux.connect(group, path, name=f"dns-app{index}", timeout=5.0) as c:
        print("ready", flush=True)
        sys.stdin.readline()
        for r in range(rounds):
            pending: dict[int, tuple[int, str]] = {}  # seq -> (id, name)
            for k in range(pipeline):
                qid = k + 1
                name = names[(r * pipeline + k) % len(names)]
                pending[c.send(dns_query(qid, name))] = (qid, name)
                counts["queries"] += 1
            while pending:
                try:
                    msg = c.recv(timeout=RECV_TIMEOUT)
                except TimeoutError:
                    counts["timeouts"] += len(pending)
                    problems.append(f"round {r}: no outcome for seqs {sorted(pending)}")
                    break
                except KmuxError as exc:
                    if exc.seq not in pending:
                        counts["mismatches"] += 1
                        problems.append(f"round {r}: notice {exc.code} for seq {exc.seq}, not in flight")
                        continue
                    qid, _ = pending.pop(exc.seq)
                    if exc.details.get("id") != qid:
                        counts["mismatches"] += 1
                        problems.append(f"round {r}: notice {exc.code} names id {exc.details.get('id')}, not {qid}")
                    counts[exc.code] += 1
                    continue
                answer = dns_parse(msg)
                match = [s for s, (qid, name) in pending.items()
                         if qid == answer.id and dns_question(name) == answer.question]
                if not match:
                    counts["mismatches"] += 1
                    problems.append(f"round {r}: answer id {answer.id} matches no query in flight")
                    continue
                del pending[match[0]]
                counts["answers"] += 1
    return {"index": index, "counts": dict(counts), "problems": problems[:5]}


def main() -> None:
    path, group, index, rounds, pipeline, names = sys.argv[1:7]
    result = run(path, group, int(index), int(rounds), int(pipeline), json.loads(names))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
