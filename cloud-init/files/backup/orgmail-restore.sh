#!/bin/sh
exec /usr/local/sbin/orgmail-backup restore "$@"
