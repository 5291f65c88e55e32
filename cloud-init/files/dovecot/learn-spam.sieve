# orgmail: a message a user moves or copies into Junk teaches rspamd spam (IMAPSieve).
# :try: if rspamd cannot learn, the move still happens.
require ["vnd.dovecot.pipe", "copy"];
pipe :copy :try "rspamd-learn" ["spam"];
