#!/usr/bin/env bash
# Build, once, a cached Debian 13 (trixie) root for orgmail's boot tests
# (docs/design.md, "How things are proven here", layer 3).
#
#   scripts/e2e-rootfs.sh [DIR]
#
# DIR defaults to ${ORGMAIL_E2E_CACHE:-/var/cache/orgmail-e2e}/rootfs-trixie.
# The root is rebuilt only when the package list or BUILD_REV below changes:
# a hash of both is kept in DIR.stamp. Needs root, debootstrap and
# systemd-nspawn, and network access to the Debian archive (build time only;
# the booted host needs no network).
#
# Test overrides made here (the booted host differs from the AWS AMI in these,
# and only in these):
#   * every package the host installs is pre-installed, and the apt lists are
#     kept, so cloud-init's package module finds them installed and needs no
#     network;
#   * the mail services are ordered after cloud-config.service (drop-in
#     10-orgmail-e2e.conf). write_files, disk_setup and mounts run in
#     cloud-init-network.service, which is Before=sysinit.target, so the
#     services would see those files anyway; the drop-in also puts them after
#     the config stage, nearer to AWS, where the package install in the final
#     stage is what first starts them;
#   * orgmail-e2e-fstab-devices.service mounts the fstab entries whose source
#     is a device (/dev/..., LABEL=, UUID=) at boot: systemd-fstab-generator
#     ignores those inside a container ("Running in a container, ignoring
#     fstab device entry"), where on a VM it makes .mount units of them.
#     (Explicit .mount units work in the container as they are.);
#   * apt does not retry (/etc/apt/apt.conf.d/99orgmail-e2e): package_update
#     at boot fails its fetches at once (apt-get update still exits 0) instead
#     of spending about 15 s on retries;
#   * /etc/resolv.conf points at 127.0.0.1 (nothing listens there unless a
#     test starts a resolver in the guest), so no lookup leaves the guest;
#   * /etc/cloud/cloud.cfg.d/90-orgmail-e2e.cfg: datasource_list [NoCloud, None]
#     so cloud-init reads the NoCloud seed and never probes the EC2 metadata
#     service.
#
# The bare variant (ORGMAIL_E2E_BARE="<the packages the user-data installs>",
# DIR another path) is the AMI's state instead: none of those packages, so
# cloud-init's package step installs them at the first boot, as on EC2, and
# their maintainer scripts start what they start. Beside it, DIR.mirror holds
# the Debian archive's signed lists and every package that install downloads,
# served by tests/e2e/mirror.py. It differs from the root above in: no mail
# packages, no drop-ins ordering mail units, no postfix debconf answer (the
# user-data gives it), and
#   * deb.debian.org is 127.0.0.1 in /etc/cloud/templates/hosts.debian.tmpl
#     (cloud-init writes /etc/hosts from it), where the mirror listens;
#   * apt ignores Valid-Until (the security suite's lists expire in a week,
#     the mirror's copy is as old as the root).
set -euo pipefail

SUITE=trixie
MIRROR=${ORGMAIL_E2E_MIRROR:-http://deb.debian.org/debian}
CACHE=${ORGMAIL_E2E_CACHE:-/var/cache/orgmail-e2e}
DIR=${1:-$CACHE/rootfs-$SUITE}
DIR=${DIR%/}

# Bump when the build steps change in a way the package list does not show.
BUILD_REV=5

# What the host runs (keep in step with the packages the user-data installs),
# plus what the probes use (python3, swaks, netcat, curl, openssl), plus
# openssh-server, which Debian's AMI has (without ssh-keygen cloud-init's ssh
# module ends "degraded done").
PACKAGES=(
  systemd-sysv dbus cloud-init
  postfix dovecot-imapd dovecot-pop3d dovecot-lmtpd
  rspamd redis-server stunnel4
  unbound postsrsd dovecot-sieve dovecot-managesieved dovecot-auth-lua libsasl2-modules
  postfix-pgsql dovecot-pgsql
  certbot python3-certbot-dns-cloudflare
  fail2ban python3-systemd nftables unattended-upgrades logrotate
  awscli restic python3-psycopg python3-bcrypt
  openssl ca-certificates
  swaks netcat-openbsd curl iproute2 e2fsprogs python3
  openssh-server
  php-fpm roundcube-core roundcube-sqlite3 roundcube-plugins nginx sqlite3
)
# Units ordered after cloud-config.service (see the header).
MAIL_UNITS=(postfix.service dovecot.service rspamd.service redis-server.service fail2ban.service)

STAMP="$DIR.stamp"
want=$(printf '%s\n' "$SUITE" "$BUILD_REV" "${PACKAGES[@]}" "${MAIL_UNITS[@]}" | sha256sum | cut -d' ' -f1)

read -r -a BARE <<<"${ORGMAIL_E2E_BARE:-}"
if [[ ${#BARE[@]} -gt 0 ]]; then
  [[ $DIR != "$CACHE/rootfs-$SUITE" ]] || { echo "e2e-rootfs: the bare root needs its own DIR" >&2; exit 1; }
  PACKAGES=(systemd-sysv dbus cloud-init openssl ca-certificates swaks netcat-openbsd curl iproute2 e2fsprogs
            python3 openssh-server)
  MAIL_UNITS=()
  want=$(printf '%s\n' "$SUITE" "$BUILD_REV" bare "${PACKAGES[@]}" "${BARE[@]}" | sha256sum | cut -d' ' -f1)
fi

if [[ -f $STAMP && $(cat "$STAMP") == "$want" && -x $DIR/usr/bin/cloud-init ]]; then
  echo "$DIR"
  exit 0
fi

[[ $(id -u) == 0 ]] || { echo "e2e-rootfs: must run as root" >&2; exit 1; }
for tool in debootstrap systemd-nspawn flock; do
  command -v "$tool" >/dev/null || { echo "e2e-rootfs: $tool is missing" >&2; exit 1; }
done

mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
# Another builder may have finished while we waited for the lock.
if [[ -f $STAMP && $(cat "$STAMP") == "$want" && -x $DIR/usr/bin/cloud-init ]]; then
  echo "$DIR"
  exit 0
fi

TMP="$DIR.tmp"
rm -rf "$TMP"
start=$(date +%s)
echo "e2e-rootfs: building $SUITE in $TMP" >&2

debootstrap --variant=minbase "$SUITE" "$TMP" "$MIRROR" >&2

in_root() {
  # Not booted: systemd is not PID 1 in there, so nothing is started by it.
  systemd-nspawn -q --register=no --keep-unit --console=pipe --resolv-conf=replace-host \
    -E DEBIAN_FRONTEND=noninteractive -D "$TMP" "$@"
}

# No service may start while packages are installed.
printf '#!/bin/sh\nexit 101\n' >"$TMP/usr/sbin/policy-rc.d"
chmod 755 "$TMP/usr/sbin/policy-rc.d"

printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
  "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" >"$TMP/etc/apt/sources.list"

[[ ${#BARE[@]} -gt 0 ]] ||
  in_root sh -c 'echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections' >&2
# Webmail's database is orgmail-sync's (on the mail volume), as on a host: no dbconfig database.
[[ ${#BARE[@]} -gt 0 ]] ||
  in_root sh -c 'echo "roundcube-core roundcube/dbconfig-install boolean false" | debconf-set-selections' >&2
in_root apt-get update -q >&2
# debootstrap takes the base from trixie, not trixie-security/-updates: bring
# it up to the lists kept, so that package_upgrade at boot has nothing to fetch.
in_root apt-get dist-upgrade -y -q -o Dpkg::Options::=--force-confold >&2
# Recommends are installed, as cloud-init's apt-get install on the AMI does.
in_root apt-get install -y -q -o Dpkg::Options::=--force-confold "${PACKAGES[@]}" >&2
if [[ ${#BARE[@]} -gt 0 ]]; then
  # The mirror: what installing the host's packages downloads, and the lists the root keeps.
  rm -rf "$DIR.mirror.tmp"
  mkdir -p "$DIR.mirror.tmp/debs" "$DIR.mirror.tmp/lists"
  in_root apt-get install --download-only -y -q "${BARE[@]}" >&2
  mv "$TMP"/var/cache/apt/archives/*.deb "$DIR.mirror.tmp/debs/"
  cp "$TMP"/var/lib/apt/lists/*_InRelease "$TMP"/var/lib/apt/lists/*_Packages "$DIR.mirror.tmp/lists/"
  printf '# orgmail e2e test override: the Debian archive is the local mirror (tests/e2e/mirror.py)\n127.0.0.1 deb.debian.org\n' \
    >>"$TMP/etc/cloud/templates/hosts.debian.tmpl"
fi
in_root apt-get clean >&2   # keeps /var/lib/apt/lists (cloud-init's package module needs them)

rm -f "$TMP/usr/sbin/policy-rc.d"

# Webmail's packages are pre-installed like the rest, but a host runs them only with orgmail:webmail
# (orgmail-sync enables them then): off, and no default site on port 80.
if [[ ${#BARE[@]} -eq 0 ]]; then
  in_root systemctl disable nginx.service php8.4-fpm.service >&2
  rm -f "$TMP/etc/nginx/sites-enabled/default"
  if [[ $(in_root dpkg-query -W -f='${Status}' apache2 2>/dev/null || true) == "install ok installed" ]]; then
    echo "e2e-rootfs: apache2 came with webmail" >&2
    exit 1
  fi
fi

# Mail services start only after cloud-init wrote their configuration.
for unit in "${MAIL_UNITS[@]}"; do
  mkdir -p "$TMP/etc/systemd/system/$unit.d"
  printf '[Unit]\nAfter=cloud-config.service\n' >"$TMP/etc/systemd/system/$unit.d/10-orgmail-e2e.conf"
done

printf '// orgmail e2e test override: the guest has no network, fail fetches at once\nAcquire::Retries "0";\n' \
  >"$TMP/etc/apt/apt.conf.d/99orgmail-e2e"
[[ ${#BARE[@]} -eq 0 ]] ||
  printf '// orgmail e2e test override: the mirror'"'"'s lists are as old as the root\nAcquire::Check-Valid-Until "false";\n' \
    >>"$TMP/etc/apt/apt.conf.d/99orgmail-e2e"

# Mount fstab device entries, which systemd ignores in a container.
cat >"$TMP/usr/local/sbin/orgmail-e2e-fstab-devices" <<'SH'
#!/bin/sh
# orgmail e2e test override: systemd-fstab-generator ignores fstab entries of
# devices in a container; mount them here as it would on a VM. Fails when an
# entry without nofail cannot be mounted.
findmnt --fstab --noheadings --raw --output SOURCE,TARGET,OPTIONS | while read -r src target opts; do
  case $src in /dev/* | LABEL=* | UUID=* | PARTUUID=* | PARTLABEL=*) ;; *) continue ;; esac
  case $target in /) continue ;; esac
  mountpoint -q "$target" && continue
  mkdir -p "$target"
  mount "$target" && continue
  case ",$opts," in *,nofail,*) echo "nofail: $src not mounted on $target" >&2 ;; *) exit 1 ;; esac
done
SH
chmod 755 "$TMP/usr/local/sbin/orgmail-e2e-fstab-devices"
cat >"$TMP/etc/systemd/system/orgmail-e2e-fstab-devices.service" <<'UNIT'
[Unit]
Description=orgmail e2e test override: mount fstab device entries (ignored by systemd in containers)
DefaultDependencies=no
After=local-fs-pre.target
Before=local-fs.target
ConditionVirtualization=container

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/orgmail-e2e-fstab-devices

[Install]
WantedBy=local-fs.target
UNIT
mkdir -p "$TMP/etc/systemd/system/local-fs.target.wants"
ln -sf ../orgmail-e2e-fstab-devices.service "$TMP/etc/systemd/system/local-fs.target.wants/"

cat >"$TMP/etc/cloud/cloud.cfg.d/90-orgmail-e2e.cfg" <<'CFG'
# orgmail e2e test override: read only the NoCloud seed, never probe EC2's IMDS.
datasource_list: [ NoCloud, None ]
CFG

# Every boot of a fresh copy is a first boot, for systemd and for cloud-init.
: >"$TMP/etc/machine-id"
rm -f "$TMP/var/lib/dbus/machine-id"
rm -rf "$TMP/var/lib/cloud" "$TMP"/var/log/cloud-init*
mkdir -p "$TMP/var/lib/cloud"
rm -f "$TMP/etc/hostname"
# Host keys are made by cloud-init at first boot, as on the AMI.
rm -f "$TMP"/etc/ssh/ssh_host_*
rm -rf "$TMP"/var/log/journal/*

# Facts for debugging.
in_root dpkg-query -W -f '${Package} ${Version}\n' >"$TMP/etc/orgmail-e2e-packages"

# After the last in_root, which replaces it with the build host's.
rm -f "$TMP/etc/resolv.conf"
printf '# orgmail e2e: no resolver unless a test starts one in the guest\nnameserver 127.0.0.1\n' >"$TMP/etc/resolv.conf"

rm -rf "$DIR"
mv "$TMP" "$DIR"
if [[ ${#BARE[@]} -gt 0 ]]; then
  rm -rf "$DIR.mirror"
  mv "$DIR.mirror.tmp" "$DIR.mirror"
fi
echo "$want" >"$STAMP"
echo "e2e-rootfs: built $DIR in $(( $(date +%s) - start ))s ($(du -sh "$DIR" | cut -f1))" >&2
echo "$DIR"
