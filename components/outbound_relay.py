"""The ISP cluster's outbound relays: a small fixed pool of hosts through which all outside mail leaves.

Each has its own protected Elastic IP with an A record and a PTR (relayN.<zone>), and every domain's SPF
names exactly these addresses (components/dns_records.py, cluster_spf_value): the load balancer's addresses
never send. The edges hand them outside mail on port 25 (only the edges: components/firewall.py); each keeps
its queue on its own protected gp3 volume, like today's relays, so mail it accepted outlives its instance.
With outbound.relay ses the relays hand the mail of our domains and bounces to Amazon SES instead (the
relays' config and the SES SMTP credentials in their SSM path, applied by `orgmail-sync --cluster` at boot
and every five minutes); forwarded mail, whose From: SES refuses, still leaves from their own addresses.

The first relay also keeps the edges' certificate of the MX name: certbot (DNS-01 through the stack's ACME
Worker, the MX name's key in the relays' SSM path) with its state on this relay's volume, the renewed
certificate published for the edges in SSM (components/edge.py, EDGE_CERTIFICATE).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from components.edge import edge_certificate_parameter
from components.server import PLACEHOLDER_VOLUME_ID, HostSpec
from components.tiers import INSTANCE_SPECS
from components.userdata import RELAY_PORTS, ClusterHost, RenderedFile, cluster_files, cluster_user_data, role_bundle


@dataclass(frozen=True)
class RelayArgs:
    """What an outbound relay's configuration is rendered from: plain values, no secret."""

    stack: str
    region: str
    ssm_path: str  # the stack's path: the relays read <ssm_path>/relay only
    hostname: str
    mail_host: str
    queue_volume_id: str
    edge_networks: tuple[str, ...]  # the only clients (mynetworks, nftables)
    # The first relay keeps the edges' certificate of the MX name: certbot through the stack's ACME Worker,
    # its state on this relay's volume, the result published for the edges (components/edge.py).
    keeps_edge_certificate: bool = False
    acme_url: str = ""
    ssm_agent: bool = False  # admin.ssmSessionManager
    # Test overrides (tests/e2e/test_cluster.py):
    install_packages: bool = True
    aws_environment: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.edge_networks:
            raise ValueError("a relay needs the edges' subnets (its only clients)")
        for cidr in self.edge_networks:
            if ipaddress.ip_network(cidr).version != 4:
                raise ValueError(f"edge subnet {cidr!r}: IPv4 only")
        if self.keeps_edge_certificate and not re.fullmatch(r"https://[a-z0-9.-]+/[a-z0-9/]+", self.acme_url):
            raise ValueError(f"the relay that keeps the edges' certificate needs the ACME Worker's URL, not {self.acme_url!r}")


RELAY_PACKAGES = ("postfix", "nftables", "unattended-upgrades", "awscli", "curl", "openssl", "logrotate", "certbot")
# Above rateLimits.messageSizeMb's ceiling (200 MiB) and an edge's headers: never refuse what an edge took.
RELAY_MESSAGE_SIZE_LIMIT = 210 * 1024 * 1024

# Postfix's configuration names the relay (its HELO name): in its own user-data.
RELAY_HOST_FILES: tuple[tuple[str, str, str], ...] = (
    ("cluster/relay-main.cf.j2", "/etc/postfix/main.cf", "0644"),
    ("cluster/relay-master.cf.j2", "/etc/postfix/master.cf", "0644"),
)
# The same on every relay: in the relays' bundle (components/userdata.py).
RELAY_FILES: tuple[tuple[str, str, str], ...] = (
    ("orgmail/volume.py", "/usr/local/sbin/orgmail-volume", "0755"),
    ("systemd/orgmail-volume.service", "/etc/systemd/system/orgmail-volume.service", "0644"),
    ("orgmail/queue.sh", "/usr/local/sbin/orgmail-queue", "0755"),
    ("systemd/orgmail-queue.service", "/etc/systemd/system/orgmail-queue.service", "0644"),
    ("systemd/data-volume.conf.j2", "/etc/systemd/system/postfix.service.d/orgmail.conf", "0644"),
    # The edges' certificate (used on the first relay only; the bundle is the same for every relay).
    ("orgmail/acme-hook.py", "/usr/local/sbin/orgmail-acme-hook", "0755"),
    ("cluster/edge-cert-publish.sh.j2", "/usr/local/sbin/orgmail-edge-cert-publish", "0755"),
    ("cluster/orgmail-edge-cert.service.j2", "/etc/systemd/system/orgmail-edge-cert.service", "0644"),
    ("cluster/orgmail-edge-cert.timer", "/etc/systemd/system/orgmail-edge-cert.timer", "0644"),
)


def relay_cluster_host(args: RelayArgs) -> ClusterHost:
    return ClusterHost(stack=args.stack, role="relay", region=args.region, ssm_path=f"{args.ssm_path}/relay",
                       hostname=args.hostname, packages=RELAY_PACKAGES, services=("postfix.service",),
                       tls_units=("postfix",), ssm_agent=args.ssm_agent, install_packages=args.install_packages,
                       aws_environment=args.aws_environment)


def render_relay_files(args: RelayArgs) -> list[RenderedFile]:
    """Every file an outbound relay gets: its boot files and Postfix's configuration (user-data), the rest in
    the relays' bundle."""
    context: dict[str, object] = {
        "mail_host": args.mail_host, "edge_networks": args.edge_networks,
        "message_size_limit": RELAY_MESSAGE_SIZE_LIMIT, "mail_ports": RELAY_PORTS, "mail_sources": args.edge_networks,
        "mail_sources_name": "the edges' subnets", "data_volume_id": args.queue_volume_id, "tls_name": args.hostname,
        "keeps_edge_certificate": args.keeps_edge_certificate, "acme_url": args.acme_url,
        "edge_certificate_parameter": edge_certificate_parameter(args.ssm_path)}
    return cluster_files(relay_cluster_host(args), context, list(RELAY_FILES), list(RELAY_HOST_FILES))


def relay_user_data(args: RelayArgs) -> str:
    """The outbound relay's cloud-init user-data: Postfix relaying the edges' mail, nothing else."""
    return cluster_user_data(relay_cluster_host(args), render_relay_files(args))


def relay_spec(instance_type: str, queue_gb: int, stack: str, region: str, ssm_path: str, hostname: str,
               mail_host: str, edge_networks: tuple[str, ...], keeps_edge_certificate: bool, acme_url: str,
               ssm_agent: bool) -> HostSpec:
    spec = INSTANCE_SPECS.get(instance_type)

    def args(volume_id: str) -> RelayArgs:
        return RelayArgs(stack=stack, region=region, ssm_path=ssm_path, hostname=hostname, mail_host=mail_host,
                         queue_volume_id=volume_id, edge_networks=edge_networks,
                         keeps_edge_certificate=keeps_edge_certificate, acme_url=acme_url, ssm_agent=ssm_agent)

    return HostSpec(instance_type=instance_type, burstable=spec.burstable if spec else instance_type.startswith("t"),
                    volume_gb=queue_gb, keeps_mail=False, user_data=lambda volume_id: relay_user_data(args(volume_id)),
                    bundle=role_bundle(render_relay_files(args(PLACEHOLDER_VOLUME_ID))))
