# orgmail: a message a user moves out of Junk teaches rspamd ham, unless it goes to Trash.
require ["vnd.dovecot.pipe", "copy", "environment", "imapsieve"];
if environment :is "imap.mailbox" ["Trash", "Junk"] {
  stop;
}
pipe :copy :try "rspamd-learn" ["ham"];
