"""(issue 15) Inbound throughput of the ISP cluster: port 25 through the load balancer and ONE edge to two shards.

The cluster of tests/e2e/test_cluster.py (booted_cluster: HAProxy sending PROXY v2 as the NLB stand-in, two
edges, two shards, an outbound relay, PostgreSQL with a replica), with the edges' per-client limits lifted (as
bench/host.py lifts the single host's). The second edge's mail services are stopped, so the load balancer sends
everything to the first: the figure is one edge's. Recipients alternate between ann (shard1) and bob (shard2).

Load: CLIENTS outside addresses in the load balancer's client namespace, SESSIONS each, every session one SMTP
connection carrying its share of the messages (Python's smtplib: the single-host figure's smtp-source cannot
choose its source address here). One untimed warm-up round greylists and passes each client once. Each round
waits for a quiet machine, then is timed from the first connection until every message is in its mailbox on its
shard; deferred mail is flushed at once (as bench/host.py does). CPU per message per service is read on the edge
and on both shards (bench/host.py cpu_seconds). Figures only: never pass or fail.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import cpu_times, log, steal_pct, summary
from bench.host import cpu_seconds, wait_quiet
from components.settings import DEFAULT_RATE_LIMITS
from components.userdata import MAIL_PORTS

CLIENTS = 4
SESSIONS = 4  # per client
MESSAGE_BYTES = 2048
# The limits a benchmark must not measure (per client: 10 connections and 60 messages a minute by default).
BENCH_LIMITS = dataclasses.replace(DEFAULT_RATE_LIMITS, connections_per_minute=10000, messages_per_minute=100000,
                                   recipients_per_minute=100000)

# The sender is the one the warm-up used (rspamd greylists by client address, sender and recipient).
LOAD = """
import smtplib, sys, threading
host, sources, sessions, count, rcpts, size, sender = (sys.argv[1], sys.argv[2].split(','), int(sys.argv[3]),
                                                      int(sys.argv[4]), sys.argv[5].split(','), int(sys.argv[6]),
                                                      sys.argv[7])
body = 'From: <{s}>\\r\\nTo: <{r}>\\r\\nSubject: bench {n}\\r\\nMessage-ID: <bench-{t}-{n}@elsewhere.example>\\r\\n\\r\\n'
failed = []
def session(k):
    try:
        c = smtplib.SMTP(host, 25, timeout=120, source_address=(sources[k % len(sources)], 0),
                         local_hostname='mx.elsewhere.example')
        for n in range(count):
            r = rcpts[(k + n) % len(rcpts)]
            c.sendmail(sender, [r], (body.format(s=sender, r=r, n=n, t=k) + ('x' * 76 + '\\r\\n') * (size // 78)).encode())
        c.quit()
    except Exception as e:
        failed.append(repr(e))
threads = [threading.Thread(target=session, args=(k,)) for k in range(len(sources) * sessions)]
for t in threads: t.start()
for t in threads: t.join()
print('failed', len(failed), failed[:3])
"""


def measure(messages: int = 1200, runs: int = 3) -> dict[str, Any]:
    from tests.e2e import harness
    from tests.e2e.cluster_net import in_ns, run, wait_for
    from tests.e2e.test_cluster import (
        LB_PUBLIC,
        SENDER,
        Sent,
        booted_cluster,
        send_until_accepted,
        stop_mail_services,
        stored_count,
    )

    harness.require_e2e([])
    workdir = Path(tempfile.mkdtemp(prefix="orgmail-bench-cluster-"))
    started = time.monotonic()
    with booted_cluster(workdir, rate_limits=BENCH_LIMITS) as c:
        boot_seconds = round(time.monotonic() - started, 1)
        edge, spare = c.edges["edge1"], c.edges["edge2"]
        stop_mail_services(spare)
        wait_for(lambda: c.lb.servers_up() == len(MAIL_PORTS), 90, "the load balancer to use the first edge only")
        rcpts = sorted(c.placed)  # ann@ (shard1), bob@ (shard2)
        shards = {a: c.shards[c.placed[a]] for a in rcpts}
        sources = [c.client() for _ in range(CLIENTS)]
        for k, source in enumerate(sources):  # greylisted once, passed by postscreen once
            for rcpt in rcpts:  # retried as a sending MTA retries (a 4xx, or a connection the stop cut)
                send_until_accepted(c, Sent(f"bench-warm-{k}-{rcpt.split('@')[0]}", rcpt, source),
                                    time.monotonic() + 180)
        per_session = max(1, messages // (CLIENTS * SESSIONS))
        total = per_session * CLIENTS * SESSIONS
        rounds: list[dict[str, Any]] = []
        for n in range(runs):
            quiet = wait_quiet()
            before = {a: stored_count(g, a) for a, g in shards.items()}
            cpu_before = {"edge": cpu_seconds(edge), **{name: cpu_seconds(g) for name, g in c.shards.items()}}
            machine_before = cpu_times()
            t0 = time.monotonic()
            out = run(*in_ns(c.lb.clients_ns, sys.executable, "-c", LOAD, LB_PUBLIC, ",".join(sources), str(SESSIONS),
                             str(per_session), ",".join(rcpts), str(MESSAGE_BYTES), SENDER), timeout=900).stdout.strip()
            accepted = time.monotonic() - t0
            if not out.startswith("failed 0 "):
                raise RuntimeError(f"the load generator: {out}")
            flushes = 0

            def delivered(before: dict[str, int] = before) -> int:
                return sum(stored_count(g, a) - before[a] for a, g in shards.items())

            while delivered() < total and time.monotonic() - t0 < 900:
                time.sleep(0.5)
                if edge.exec(["sh", "-c", "postqueue -j | grep -q delay_reason"]).returncode == 0:
                    edge.exec(["postqueue", "-f"])
                    flushes += 1
            seconds = time.monotonic() - t0
            got = delivered()
            if got < total:
                raise RuntimeError(f"round {n + 1}: {got} of {total} messages delivered in {seconds:.0f} s")
            cpu_after = {"edge": cpu_seconds(edge), **{name: cpu_seconds(g) for name, g in c.shards.items()}}
            cpu_ms = {f"{host} {unit}": round((after[unit] - cpu_before[host].get(unit, 0.0)) * 1000 / total, 2)
                      for host, after in cpu_after.items() for unit in after
                      if after[unit] - cpu_before[host].get(unit, 0.0) > 0}
            rounds.append({"messages": total, "seconds": round(seconds, 2), "accepted_seconds": round(accepted, 2),
                           "msgs_per_s": round(total / seconds, 1), "cpu_ms_per_msg": cpu_ms,
                           "queue_flushes": flushes, "steal_pct": steal_pct(machine_before, cpu_times()),
                           "quiet_before": quiet})
            log(f"cluster round {n + 1}: {rounds[-1]['msgs_per_s']} msg/s")
        per_shard = {name: stored_count(g, a) for a, g in shards.items() for name in [c.placed[a]]}
    rates = [r["msgs_per_s"] for r in rounds]
    units = sorted({u for r in rounds for u in r["cpu_ms_per_msg"]})
    return {"what": "inbound port 25 through the load balancer and one edge to two shards",
            "clients": CLIENTS, "sessions_per_client": SESSIONS, "message_bytes": MESSAGE_BYTES,
            "cluster_boot_seconds": boot_seconds, "msgs_per_s": summary(rates, 1), "rounds": rounds,
            "cpu_ms_per_msg_median": {u: round(sorted(r["cpu_ms_per_msg"].get(u, 0.0) for r in rounds)[len(rounds) // 2], 2)
                                      for u in units},
            "mailbox_messages_at_end": per_shard}
