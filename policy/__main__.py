"""The orgmail CrossGuard policy pack: `pulumi preview --policy-pack policy` (see docs/pull-requests.md)."""

from orgmail_policies import POLICIES
from pulumi_policy import EnforcementLevel, PolicyPack

PolicyPack(name="orgmail", enforcement_level=EnforcementLevel.MANDATORY, policies=POLICIES)
