#!/bin/sh
# Postfix's queue on the host's protected volume (every boot, before Postfix and Dovecot): mail
# accepted but not yet delivered outlives the instance, whose root disk EC2 deletes.
set -eu
spool=/var/spool/postfix
queue=/srv/mail/postfix
mountpoint -q /srv/mail || { echo "orgmail-queue: /srv/mail is not mounted; Postfix stays down" >&2; exit 1; }
if ! mountpoint -q "$spool"; then
  if [ ! -d "$queue" ]; then
    # First boot on this volume: start from the spool the package made.
    rm -rf "$queue.new"
    cp -a "$spool" "$queue.new"
    mv "$queue.new" "$queue"
  fi
  mount --bind "$queue" "$spool"
fi
# Another image may number the postfix and postdrop users differently: hand the queue to them by
# name (this also creates the queue directories on a new volume).
postfix set-permissions
