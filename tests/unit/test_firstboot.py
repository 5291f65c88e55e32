"""Issue 17 item 8: the first boot configures every service before it starts, puts management access
first, retries at every boot until it has finished, and reports failure off the host."""

from __future__ import annotations

import configparser
import json
import re

import pytest
import yaml

from components.settings import load_settings
from components.userdata import HostConfig, packages, render_files, render_user_data, without_shell_comments
from tests.unit.conftest import raw_config, run_stack
from tests.unit.test_userdata import MAILBOX, RELAY

DONE = "/var/lib/orgmail/bootstrap.done"
UNIT = "/etc/systemd/system/orgmail-bootstrap.service"
ALARM = "aws:cloudwatch/metricAlarm:MetricAlarm"


def bootstrap(host: HostConfig) -> list[str]:
    return {f.path: f.content for f in render_files(host)}["/usr/local/sbin/orgmail-bootstrap"].splitlines()


def first(lines: list[str], pattern: str) -> int:
    found = [n for n, line in enumerate(lines) if re.search(pattern, line)]
    assert found, pattern
    return found[0]


@pytest.mark.parametrize("host", [MAILBOX, RELAY], ids=["mailbox", "relay"])
def test_package_install_starts_no_service_until_the_bootstrap_finished(host: HostConfig) -> None:
    """Debian's packages start their services with the stock configuration (Dovecot with PAM logins,
    rspamd, Redis...) as they install; cloud-init installs them before the bootstrap configures them.
    policy-rc.d (which every maintainer script's start goes through) forbids it from the first
    thing cloud-init runs until the bootstrap has finished, and at every boot before that."""
    doc = yaml.safe_load(render_user_data(host))
    [script] = doc["bootcmd"]
    assert (f"if [ ! -e {DONE} ]; then\n"
            "  printf '#!/bin/sh\\nexit 101\\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d\nfi\n") in script
    lines = bootstrap(host)
    # Lifted only once everything is configured and started, right after the done-marker.
    assert lines[-3:] == ["touch $state/bootstrap.done", "rm -f /usr/sbin/policy-rc.d", 'log "done"']
    assert "state=/var/lib/orgmail" in lines


@pytest.mark.parametrize("host", [MAILBOX, RELAY], ids=["mailbox", "relay"])
def test_bootstrap_runs_at_every_boot_until_it_has_finished(host: HostConfig) -> None:
    """A failed run is retried, backing off (30 s, growing to 30 min), without a start limit, and at
    every boot until the done-marker exists; cloud-init only enables and starts the unit."""
    doc = yaml.safe_load(render_user_data(host))
    assert doc["runcmd"] == [["systemctl", "enable", "--now", "--no-block", "orgmail-bootstrap.service"]]
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string({f.path: f.content for f in render_files(host)}[UNIT])
    assert unit["Unit"]["ConditionPathExists"] == f"!{DONE}"
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert "cloud-final" not in unit["Unit"].get("After", "")  # cloud-final is After=multi-user.target
    service = unit["Service"]
    assert service["Type"] == "oneshot" and service["Restart"] == "on-failure"
    assert (service["RestartSec"], service["RestartSteps"], service["RestartMaxDelaySec"]) == ("30s", "5", "30min")
    assert service["ExecStart"] == "/usr/local/sbin/orgmail-bootstrap"
    assert service["ExecStopPost"] == "/usr/local/sbin/orgmail-bootstrap report"
    assert service["EnvironmentFile"] == "/etc/orgmail/host.env"  # STACK, HOSTNAME, REGION for the report
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_each_run_reports_to_cloudwatch_and_a_status_file() -> None:
    lines = bootstrap(MAILBOX)
    report = "\n".join(lines[first(lines, r'"\$\{1:-\}" = report'):first(lines, r"^  exit 0$") + 1])
    assert 'r=1; [ "$SERVICE_RESULT" = success ] && r=0' in report
    assert "$state/bootstrap-status.json" in report
    assert ("aws cloudwatch put-metric-data --region \"$REGION\" --namespace orgmail --metric-name BootstrapResult"
            in report and '--dimensions "Stack=$STACK,Host=$HOSTNAME" --value $r' in report)


@pytest.mark.parametrize("host", [MAILBOX, RELAY], ids=["mailbox", "relay"])
def test_management_access_comes_first(host: HostConfig) -> None:
    """The firewall and the SSM agent before anything that can fail: SSM (the bundle, orgmail-sync), the
    package repair, the data volume, the certificate."""
    lines = bootstrap(host)
    firewall = first(lines, r"^\[ ! -x /usr/sbin/nft \] \|\| firewall$")
    agent = first(lines, r"amazon-ssm-agent\.deb")
    for risky in (r"dpkg --configure -a", r"apt-get", r"orgmail-unbundle", r"orgmail-sync --boot",
                  r"nvme-Amazon_Elastic_Block_Store", r"orgmail-cert", r"systemctl (re)?start"):
        assert firewall < agent < first(lines, risky), risky
    # Again once the package repair may have brought nftables itself.
    assert "firewall" in lines[first(lines, r"apt-get install"):first(lines, r"orgmail-sync --boot")]


@pytest.mark.parametrize("host", [MAILBOX, RELAY], ids=["mailbox", "relay"])
def test_bootstrap_installs_what_a_failed_package_step_left_out(host: HostConfig) -> None:
    lines = bootstrap(host)
    query = lines[first(lines, r"^missing=\$\(dpkg-query")]
    assert query.split("dpkg-query -W -f '${db:Status-Abbrev} ${Package}\\n' ")[1].split(" 2>&1")[0].split() == \
        list(packages(host))
    assert first(lines, r"^dpkg --configure -a$") < first(lines, r"^missing=")


def test_shell_scripts_ship_without_comments() -> None:
    for host in (MAILBOX, RELAY):
        for f in render_files(host):
            if f.content.startswith(("#!/bin/sh\n", "#!/bin/bash\n")):
                assert not [line for line in f.content.splitlines()[1:] if line.lstrip().startswith("#")], f.path
    with pytest.raises(ValueError, match="here-documents"):
        without_shell_comments("#!/bin/sh\ncat <<EOF\n# not a comment\nEOF\n", "x.sh")


@pytest.mark.parametrize("stack", ["dev", "isp-single"])
def test_a_failed_bootstrap_raises_an_alarm_per_host(stack: str) -> None:
    run = run_stack(stack)
    settings = load_settings(raw_config(stack), stack)
    alarms = [a.inputs for a in run.of_type(ALARM) if a.inputs["metricName"] == "BootstrapResult"]
    assert sorted(a["dimensions"]["Host"] for a in alarms) == sorted(settings.mx_hosts)
    assert len(alarms) == len(run.of_type("aws:ec2/instance:Instance"))
    for a in alarms:
        assert a["namespace"] == "orgmail" and a["dimensions"]["Stack"] == stack and len(a["dimensions"]) == 2
        assert a["statistic"] == "Maximum" and a["comparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert float(a["threshold"]) == 1 and a["treatMissingData"] == "ignore"  # on until a run finishes


def test_every_host_role_may_report_in_orgmails_namespace_only() -> None:
    run = run_stack("isp-single")
    for name in ("secrets-host-policy", "secrets-relay-policy"):
        policy = json.loads(run.one("aws:iam/rolePolicy:RolePolicy", name).inputs["policy"])
        [st] = [st for st in policy["Statement"] if any(a.startswith("cloudwatch:") for a in st["Action"])]
        assert st == {"Sid": "ReportToCloudWatch", "Effect": "Allow", "Action": ["cloudwatch:PutMetricData"],
                      "Resource": "*", "Condition": {"StringEquals": {"cloudwatch:namespace": "orgmail"}}}


def test_the_ssm_agent_is_installed_before_ssm_is_asked_anything() -> None:
    """The bootstrap's management step installs and starts AWS's agent from the region's bucket, in shell
    (orgmail-sync comes with the bundle, from SSM): no `aws` call and no bundle before it, and a failure
    only warns."""
    for host in (MAILBOX, RELAY):
        lines = bootstrap(host)
        start, end = first(lines, r"amazon-ssm-agent 2>/dev/null"), first(lines, r"^  rm -f \$deb$")
        block = "\n".join(lines[start:end + 1])
        url = f"https://s3.{host.region}.amazonaws.com/amazon-ssm-{host.region}/latest/debian_$(dpkg --print-architecture)"
        assert f'curl -fsS --max-time 120 -o $deb "{url}/amazon-ssm-agent.deb" && dpkg -i $deb' in block
        assert "systemctl enable --now amazon-ssm-agent.service" in block
        assert 'log "warning: could not install the SSM agent' in block and "exit" not in block
        before = [line for line in lines[:start] if not line.lstrip().startswith("timeout 120 aws cloudwatch")]
        assert not [line for line in before if re.search(r"\baws |orgmail-unbundle|orgmail-sync", line)], before
