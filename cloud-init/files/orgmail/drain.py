#!/usr/bin/python3
"""orgmail-drain: an edge that leaves its Auto Scaling group delivers its queue before it goes.

Auto Scaling holds a terminating edge in Terminating:Wait (the lifecycle hook DRAIN_HOOK); the instance
metadata then says `autoscaling/target-lifecycle-state` is `Terminated`. Until then this service only asks
every POLL_SECONDS. Once it is: the load balancer has already deregistered the edge, so it stops taking mail
(Postfix's inet listeners off), flushes its queue until nothing is left (mail for a shard that is down, or for
the relays), extends the hook's heartbeat while mail remains, and completes the lifecycle action with
CONTINUE. The group then terminates it. Mail still queued after Auto Scaling's global limit (48 hours) is lost
with the instance; it says how much in the journal every hour.

Reads /etc/orgmail/host.env (its unit's EnvironmentFile): REGION, AUTOSCALING_GROUP, DRAIN_HOOK,
DRAIN_HEARTBEAT_SECONDS, and AWS_EC2_METADATA_SERVICE_ENDPOINT where the instance metadata is elsewhere
(a test's stand-in; awscli honours the same variable).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

POLL_SECONDS = 5
FLUSH_SECONDS = 10
REPORT_SECONDS = 3600
IMDS = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254").rstrip("/")


def log(message: str) -> None:
    print(f"orgmail-drain: {message}", flush=True)


def metadata(path: str) -> str | None:
    """One instance metadata item over IMDSv2 (the launch template requires tokens), None if not answered."""
    try:
        put = urllib.request.Request(f"{IMDS}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        with urllib.request.urlopen(put, timeout=5) as reply:
            token = reply.read().decode()
        get = urllib.request.Request(f"{IMDS}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(get, timeout=5) as reply:
            return reply.read().decode().strip()
    except (OSError, urllib.error.URLError):
        return None


def queued() -> int:
    """Messages in Postfix's queues (maildrop, incoming, active, deferred, hold): one JSON line each."""
    out = subprocess.run(["postqueue", "-j"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def stop_accepting() -> None:
    """No new SMTP connection on 25, 465 or 587 (Postfix's inet services); open sessions end by themselves.
    Dovecot keeps running: its LMTP proxy on 127.0.0.1 carries the queue to the shards."""
    current = subprocess.run(["postconf", "-h", "master_service_disable"], capture_output=True, text=True,
                             check=True).stdout.strip()
    if current != "inet":
        subprocess.run(["postconf", "-e", "master_service_disable=inet"], check=True)
        subprocess.run(["postfix", "reload"], check=True)


def lifecycle(action: str, env: dict, instance_id: str, *extra: str) -> bool:
    """`aws autoscaling <action>` for this instance's pending action of the drain hook."""
    cmd = ["aws", "autoscaling", action, "--region", env["REGION"], "--auto-scaling-group-name",
           env["AUTOSCALING_GROUP"], "--lifecycle-hook-name", env["DRAIN_HOOK"], "--instance-id", instance_id, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        log(f"warning: {action} failed: {res.stderr.strip()[-300:]}")
    return res.returncode == 0


def drain(env: dict, instance_id: str, clock=time.monotonic, sleep=time.sleep) -> None:
    """Deliver the queue, keeping the lifecycle action alive while mail remains; then complete it."""
    heartbeat_every = int(env.get("DRAIN_HEARTBEAT_SECONDS", "3600")) // 3  # well before the hook times out
    stop_accepting()
    start = last_beat = last_report = clock()
    count = queued()
    log(f"leaving the Auto Scaling group: no new mail; delivering {count} queued message(s)")
    while count:
        subprocess.run(["postqueue", "-f"], check=True)
        sleep(FLUSH_SECONDS)
        count = queued()
        now = clock()
        if count and now - last_beat >= heartbeat_every \
                and lifecycle("record-lifecycle-action-heartbeat", env, instance_id):
            last_beat = now
        if count and now - last_report >= REPORT_SECONDS:
            log(f"{count} message(s) still queued after {int(now - start) // 60} minutes; lost if still here "
                f"{48 - int(now - start) // 3600} hours from now (Auto Scaling's limit)")
            last_report = now
    log(f"queue empty after {int(clock() - start)} s: completing the lifecycle action")
    while not lifecycle("complete-lifecycle-action", env, instance_id, "--lifecycle-action-result", "CONTINUE"):
        sleep(FLUSH_SECONDS)  # else the hook's heartbeat timeout continues the termination anyway


def main() -> int:
    env = dict(os.environ)
    missing = [k for k in ("REGION", "AUTOSCALING_GROUP", "DRAIN_HOOK") if not env.get(k)]
    if missing:
        log(f"not set in /etc/orgmail/host.env: {', '.join(missing)}")
        return 1
    answered = True
    while True:
        state = metadata("autoscaling/target-lifecycle-state")
        if (state is None) == answered:  # say so once when it stops answering, once when it answers again
            answered = state is not None
            log("instance metadata answers" if answered else "warning: instance metadata does not answer")
        if state == "Terminated":
            break
        time.sleep(POLL_SECONDS)
    instance_id = metadata("instance-id")
    if not instance_id:
        log("no instance id in the instance metadata")
        return 1
    drain(env, instance_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
