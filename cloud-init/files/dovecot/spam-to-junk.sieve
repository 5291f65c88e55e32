# orgmail: mail rspamd marks as spam (its "add header" action: X-Spam: Yes) goes to Junk, not INBOX.
# Runs before any personal script at every delivery (Dovecot LMTP, sieve_script spam-to-junk).
require ["fileinto", "mailbox"];
if header :is "X-Spam" "Yes" {
  fileinto :create "Junk";
  stop;
}
