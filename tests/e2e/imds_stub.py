"""A stand-in for an edge's instance metadata service and for the Auto Scaling API, in the edge's network namespace.

- Instance metadata, IMDSv2 only (the edges' launch template requires tokens): `PUT /latest/api/token`, then
  `GET /latest/meta-data/<item>` with the token; a GET without a valid token gets 401, as on EC2.
  `autoscaling/target-lifecycle-state` is the content of `<dir>/lifecycle-state` (`InService` while there is
  none: the test writes `Terminated` when Auto Scaling would hold the edge in Terminating:Wait);
  `instance-id` is the one given.
- Auto Scaling's query API (`POST /`, what awscli sends where `AWS_ENDPOINT_URL_AUTO_SCALING` points):
  `CompleteLifecycleAction` and `RecordLifecycleActionHeartbeat`, their parameters checked as the API's model
  requires them, each call recorded as one JSON line in `<dir>/autoscaling.jsonl`.

Run: ``python -m tests.e2e.imds_stub PORT DIR INSTANCE_ID`` (tests/e2e/test_cluster.py starts it).
"""

from __future__ import annotations

import json
import secrets
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

NAMESPACE = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
# Required parameters of each action (botocore's autoscaling service model), and the allowed results.
ACTIONS = {
    "CompleteLifecycleAction": ("LifecycleHookName", "AutoScalingGroupName", "LifecycleActionResult"),
    "RecordLifecycleActionHeartbeat": ("LifecycleHookName", "AutoScalingGroupName"),
}
RESULTS = ("CONTINUE", "ABANDON")


class Handler(BaseHTTPRequestHandler):
    server_version = "imds-stub"
    directory = Path(".")
    instance_id = ""
    tokens: set[str] = set()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, code: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self.reply(400, "")
            return
        token = secrets.token_urlsafe(24)
        self.tokens.add(token)
        self.reply(200, token)

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            self.reply(401, "")
            return
        item = self.path.removeprefix("/latest/meta-data/")
        if item == "autoscaling/target-lifecycle-state":
            state = self.directory / "lifecycle-state"
            self.reply(200, state.read_text().strip() if state.exists() else "InService")
        elif item == "instance-id":
            self.reply(200, self.instance_id)
        else:
            self.reply(404, "")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        params = {k: v[0] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode()).items()}
        action = params.get("Action", "")
        missing = [p for p in ACTIONS.get(action, ()) if not params.get(p)]
        if action not in ACTIONS or missing or not (params.get("InstanceId") or params.get("LifecycleActionToken")) \
                or params.get("LifecycleActionResult", "CONTINUE") not in RESULTS:
            error = (f'<ErrorResponse xmlns="{NAMESPACE}"><Error><Type>Sender</Type><Code>ValidationError</Code>'
                     f"<Message>{action}: missing or invalid {missing}</Message></Error>"
                     "<RequestId>stub</RequestId></ErrorResponse>")
            self.reply(400, error, "text/xml")
            return
        with (self.directory / "autoscaling.jsonl").open("a") as log:
            log.write(json.dumps(params) + "\n")
        self.reply(200, f'<{action}Response xmlns="{NAMESPACE}"><{action}Result/>'
                        f"<ResponseMetadata><RequestId>stub</RequestId></ResponseMetadata></{action}Response>",
                   "text/xml")


def main() -> None:
    port, directory, instance_id = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    Handler.directory, Handler.instance_id = directory, instance_id
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
