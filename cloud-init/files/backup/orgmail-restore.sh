#!/bin/bash
# orgmail-restore: restore from the restic backup in the stack's S3 bucket (see docs/backups.md).
#   orgmail-restore mailbox ADDRESS [FOLDER] [SNAPSHOT]  one mailbox (or one folder), in place
#   orgmail-restore all [SNAPSHOT]  mailboxes, DKIM/rspamd/Redis state and certificates onto this host
#   orgmail-restore snapshots [ARGS]  list the snapshots (restic snapshots ARGS)
# In place: messages missing from the mailbox come back, newer ones stay. SNAPSHOT: default latest.
set -euo pipefail
set -a; eval "$(/usr/local/sbin/orgmail-backup env)"; set +a
usage() { sed -n '3,6p' "$0" >&2; exit 2; }
case "${1:-}" in
  snapshots) shift; exec restic snapshots "$@" ;;
  mailbox)
    address=${2:-}; [[ $address =~ ^[a-z0-9._+-]+@[a-z0-9.-]+$ ]] || usage
    home=/srv/mail/vmail/${address#*@}/${address%@*}
    dir=$home
    case "${3:-}" in
      "") ;;
      INBOX) dir=$home/Maildir ;;
      *) dir=$home/Maildir/.${3//\//.} ;;
    esac
    restic ls "${4:-latest}" "$dir" >/dev/null 2>&1 || { echo "no $dir in snapshot ${4:-latest}" >&2; exit 1; }
    if [ "$dir" = "$home/Maildir" ]; then  # INBOX only: not the other folders below it
      for sub in cur new tmp; do restic restore "${4:-latest}:$dir/$sub" --target "$dir/$sub"; done
    else
      restic restore "${4:-latest}:$dir" --target "$dir"
    fi
    doveadm force-resync -u "$address" '*'
    echo "orgmail-restore: restored $dir from snapshot ${4:-latest}" ;;
  all)
    systemctl stop postfix.service dovecot.service rspamd.service redis-server.service
    for path in /srv/mail/vmail /var/lib/rspamd /var/lib/redis /etc/letsencrypt /etc/orgmail/tls; do
      if restic ls "${2:-latest}" "$path" >/dev/null 2>&1; then
        restic restore "${2:-latest}:$path" --target "$path"
      fi
    done
    # Owners by name: a rebuilt host may number its system users differently.
    chown -R vmail:vmail /srv/mail/vmail
    chown -R redis:redis /var/lib/redis
    chown -R _rspamd:_rspamd /var/lib/rspamd
    [ ! -d /var/lib/rspamd/dkim ] || chown -R root:_rspamd /var/lib/rspamd/dkim
    /usr/local/sbin/orgmail-sync || true  # this stack's keys, users and maps from SSM win
    systemctl start redis-server.service rspamd.service dovecot.service postfix.service
    doveadm force-resync -A '*'
    echo "orgmail-restore: restored everything from snapshot ${2:-latest}" ;;
  *) usage ;;
esac
