"""The ISP cluster's outbound relays: a small fixed pool of hosts through which all outside mail leaves.

Each has its own protected Elastic IP with an A record and a PTR (relayN.<zone>), and every domain's SPF
names exactly these addresses (components/dns_records.py, cluster_spf_value): the load balancer's addresses
never send. The edges hand them outside mail on port 25 (only the edges: components/firewall.py); each keeps
its queue on its own protected gp3 volume, like today's relays, so mail it accepted outlives its instance.
With outbound.relay ses the edges send through Amazon SES instead, and the relays stay idle.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.server import HostSpec
from components.tiers import INSTANCE_SPECS


@dataclass(frozen=True)
class RelayArgs:
    stack: str
    region: str
    ssm_path: str  # the relays read <ssm_path>/relay only
    hostname: str
    queue_volume_id: str


def relay_user_data(args: RelayArgs) -> str:
    """The outbound relay's cloud-init user-data: rendered by the relay role (not yet built).

    A placeholder until then: it names the relay's settings and installs nothing. The lead replaces it with
    the relay's bootstrap (Postfix relaying for the edges' addresses only, HELO its own name, DKIM already
    signed by the edges), under EC2's 16 KB like every host's.
    """
    return "\n".join([
        "#cloud-config",
        "# orgmail outbound relay: placeholder user-data (the relay role is not yet built)",
        f"hostname: {args.hostname.split('.')[0]}",
        f"fqdn: {args.hostname}",
        "write_files:",
        "  - path: /etc/orgmail/relay.env",
        "    permissions: '0644'",
        "    content: |",
        f"      STACK={args.stack}",
        f"      REGION={args.region}",
        f"      SSM_PATH={args.ssm_path}/relay",
        f"      HOSTNAME={args.hostname}",
        f"      QUEUE_DEVICE=/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{args.queue_volume_id.replace('-', '')}",
        "",
    ])


def relay_spec(instance_type: str, queue_gb: int, stack: str, region: str, ssm_path: str, hostname: str) -> HostSpec:
    spec = INSTANCE_SPECS.get(instance_type)

    def user_data(volume_id: str) -> str:
        return relay_user_data(RelayArgs(stack=stack, region=region, ssm_path=ssm_path, hostname=hostname,
                                         queue_volume_id=volume_id))

    return HostSpec(instance_type=instance_type, burstable=spec.burstable if spec else instance_type.startswith("t"),
                    volume_gb=queue_gb, keeps_mail=False, user_data=user_data)
