"""The permissions boundary: the most any IAM role or user of the stack may ever do.

Every role (the host roles, the DLM role) and the SES SMTP user carries the customer managed policy
`arn:aws:iam::<account>:policy/orgmail/orgmail-permissions-boundary` as its permissions boundary, and the
deploy role may create or change a principal's policies only when that boundary is the principal's
(docs/iam/deploy-policy.json). An account administrator creates it once per account from
docs/iam/boundary-policy.json; the deploy role can neither create, change nor remove it. The program looks
it up before it creates anything, so a missing boundary stops `pulumi preview` with the command that makes it.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pulumi
import pulumi_aws as aws

BOUNDARY_NAME = "orgmail-permissions-boundary"
# The boundary's path, and the path of every role and user the program creates: the deploy role passes
# only roles under it (iam:PassRole on role/orgmail/*).
IAM_PATH = "/orgmail/"
BOUNDARY_DOCUMENT = "docs/iam/boundary-policy.json"
CREATE_COMMAND = (f"aws iam create-policy --path {IAM_PATH} --policy-name {BOUNDARY_NAME} "
                  f"--policy-document file://{BOUNDARY_DOCUMENT}")


def boundary_arn(account: str) -> str:
    return f"arn:aws:iam::{account}:policy{IAM_PATH}{BOUNDARY_NAME}"


def boundary_document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((Path(__file__).resolve().parents[1] / BOUNDARY_DOCUMENT).read_text())
    return doc


def allowed_actions(document: dict[str, Any]) -> set[str]:
    """The actions a policy document's Allow statements name (as written, patterns included)."""
    actions: set[str] = set()
    for s in document.get("Statement", []):
        if s.get("Effect") == "Allow":
            named = s.get("Action", [])
            actions |= {named} if isinstance(named, str) else set(named)
    return actions


# Actions only an ISP cluster's hosts use (its edges completing their drain lifecycle action, its first relay
# publishing the edges' certificate): a single-host stack does not need them in the account's boundary, so a
# boundary made before they were added still serves it.
CLUSTER_ONLY_ACTIONS = ("autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat",
                        "ssm:PutParameter")


def boundary_problem(arn: str, document: str | None, cluster: bool = False) -> str | None:
    """Why the account's boundary would not do (None: it allows every action of this version's document that
    the stack's principals use: the cluster's own only with `cluster`). `document` is the policy's default
    version as IAM returns it (JSON), None when it could not be read."""
    if document is None:
        return None
    granted = [a.lower() for a in allowed_actions(json.loads(document))]
    wanted = allowed_actions(boundary_document()) - (set() if cluster else set(CLUSTER_ONLY_ACTIONS))
    missing = sorted(a for a in wanted if not any(fnmatch.fnmatchcase(a.lower(), g) for g in granted))
    if not missing:
        return None
    return (f"the permissions boundary {arn} does not allow {', '.join(missing)}, which this version's hosts, "
            f"snapshots or SMTP user use; an account administrator updates it: aws iam create-policy-version "
            f"--policy-arn {arn} --policy-document file://{BOUNDARY_DOCUMENT} --set-as-default")


def permissions_boundary(provider: pulumi.ProviderResource, cluster: bool = False) -> str:
    """The boundary's ARN in the deploying account, once IAM has shown that it exists and allows what this
    version needs. Looked up synchronously, before any resource other than the provider is registered:
    without it, the run stops with pulumi.RunError (the message alone, no traceback)."""
    opts = pulumi.InvokeOptions(provider=provider)
    account = aws.get_caller_identity(opts=opts).account_id
    arn = boundary_arn(account)
    try:
        policy = aws.iam.get_policy(arn=arn, opts=opts)
    except Exception as e:  # noqa: BLE001 the provider's error is named in the message
        raise pulumi.RunError(
            f"the permissions boundary {arn} could not be read ({e}). Every IAM role and user of the stack "
            f"carries it; an account administrator creates it once per account: {CREATE_COMMAND} "
            "(and the deploy and preview roles need iam:GetPolicy and iam:GetPolicyVersion on it: docs/iam/)"
        ) from None
    problem = boundary_problem(arn, policy.policy, cluster)
    if problem is not None:
        raise pulumi.RunError(problem)
    return arn
