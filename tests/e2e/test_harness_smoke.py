"""The boot harness itself works: cloud-init runs the seed, the data disk, moto, restart."""

from __future__ import annotations

import gzip
import json
import textwrap
from typing import Any

import pytest

from .harness import AWS_TEST_ENV, BootedHost, boot_host, ebs_by_id_path, require_e2e

pytestmark = pytest.mark.e2e

DISK = ebs_by_id_path()

USER_DATA = textwrap.dedent(
    f"""\
    #cloud-config
    write_files:
      - path: /etc/orgmail-smoke
        content: "written by cloud-init\\n"
    fs_setup:
      - device: {DISK}
        filesystem: ext4
        label: maildata
    mounts:
      - [ "{DISK}", /srv/mail, ext4, "defaults,nofail", "0", "2" ]
    runcmd:
      - [ sh, -c, "echo ran > /run/orgmail-smoke-runcmd" ]
    """
).encode()


@pytest.fixture(autouse=True)
def _e2e() -> None:
    require_e2e()


def _assert_clean(status: dict[str, Any]) -> None:
    """cloud-init finished with neither errors nor warnings."""
    assert status["extended_status"] == "done", json.dumps(status, indent=2)
    assert status["errors"] == [], status["errors"]
    assert status["recoverable_errors"] == {}, status["recoverable_errors"]
    assert status["result"]["v1"]["errors"] == [], status["result"]


def test_gzip_user_data_disk_and_restart() -> None:
    with boot_host(gzip.compress(USER_DATA), name="smoke") as host:
        status = host.wait_cloud_init(timeout=300)
        _assert_clean(status)
        assert "NoCloud" in status["result"]["v1"]["datasource"]
        assert host.read_file("/etc/orgmail-smoke") == b"written by cloud-init\n"
        assert host.read_file("/run/orgmail-smoke-runcmd") == b"ran\n"
        findmnt = host.exec(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "/srv/mail"], check=True)
        assert findmnt.stdout.split() == [DISK, "ext4"]
        host.exec(["sh", "-c", "echo kept > /srv/mail/marker && sync"], check=True)

        host.restart()
        status = host.wait_cloud_init(timeout=300)
        _assert_clean(status)
        assert host.exec(["findmnt", "-n", "/srv/mail"]).returncode == 0, host.journal()
        assert host.read_file("/srv/mail/marker") == b"kept\n"


MOTO_PORT = 5000
ENDPOINT = f"http://127.0.0.1:{MOTO_PORT}"
FETCH_USER_DATA = textwrap.dedent(
    f"""\
    #cloud-config
    runcmd:
      - [ sh, -c, "AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing aws ssm get-parameter --region eu-central-1 --endpoint-url {ENDPOINT} --with-decryption --name /orgmail/test/dkim --query Parameter.Value --output text > /run/orgmail-secret" ]
    """
).encode()


def _seed_moto(host: BootedHost) -> None:
    host.start_moto(MOTO_PORT)
    host.put_ssm_parameter(ENDPOINT, "/orgmail/test/dkim", "s3cr3t value")


def test_guest_reads_secure_string_from_moto() -> None:
    get_parameter = ["aws", "ssm", "get-parameter", "--with-decryption", "--name", "/orgmail/test/dkim",
                     "--endpoint-url", ENDPOINT, "--query", "Parameter.Value", "--output", "text"]  # fmt: skip
    with boot_host(FETCH_USER_DATA, name="moto", data_disk_mb=None, before_boot=_seed_moto) as host:
        _assert_clean(host.wait_cloud_init(timeout=300))
        assert host.read_file("/run/orgmail-secret") == b"s3cr3t value\n"  # fetched by the user-data at boot

        host.put_ssm_parameter(ENDPOINT, "/orgmail/test/dkim", "rotated")
        assert host.exec(get_parameter, env=AWS_TEST_ENV, check=True).stdout == "rotated\n"

        host.restart()  # the network namespace, moto and its state stay
        assert host.start_moto(MOTO_PORT) == ENDPOINT
        _assert_clean(host.wait_cloud_init(timeout=300))
        assert host.exec(get_parameter, env=AWS_TEST_ENV, check=True).stdout == "rotated\n"
