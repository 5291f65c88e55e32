#!/bin/sh
# Every boot, before Postfix and Dovecot: Postfix's queue on the host's volume outlives the instance.
set -eu
spool=/var/spool/postfix q=/srv/mail/postfix
mountpoint -q /srv/mail || { echo "orgmail-queue: /srv/mail not mounted" >&2; exit 1; }
if ! mountpoint -q $spool; then
  # First boot on this volume: start from the package's spool.
  [ -d $q ] || { rm -rf $q.new; cp -a $spool $q.new; mv $q.new $q; }
  mount --bind $q $spool
fi
# A new image may number the postfix and postdrop users differently; also creates missing queue dirs.
postfix set-permissions
