<?php
// orgmail's Roundcube settings. orgmail-sync writes /etc/roundcube/config.inc.php, which includes this file
// and adds what is the host's own: its name (to verify its certificate), the session key, the product name.

// On the mail volume: address books and settings survive a new instance, and backups hold them.
$config['db_dsnw'] = 'sqlite:////srv/mail/webmail/roundcube.db?mode=0640';

// The host's own services over loopback, with TLS verified against the host's name (config.inc.php):
// Dovecot and Postfix see 127.0.0.1, the one address allowed an initial password (orgmail-passdb.lua).
$config['imap_host'] = 'ssl://127.0.0.1:993';
$config['smtp_host'] = 'ssl://127.0.0.1:465';
$config['smtp_user'] = '%u';
$config['smtp_pass'] = '%p';
$config['managesieve_host'] = 'tls://127.0.0.1:4190';

$config['plugins'] = ['archive', 'zipdownload', 'managesieve', 'password', 'orgmail_password'];
$config['skin'] = 'elastic';
$config['enable_installer'] = false;
$config['enable_spellcheck'] = false;
$config['log_driver'] = 'syslog';
$config['session_lifetime'] = 30;
$config['session_samesite'] = 'Strict';
$config['login_rate_limit'] = 3;
$config['x_frame_options'] = 'deny';

// Password changes go to orgmail-passwd, which checks the current password with Dovecot and keeps the
// new one on the host (README, "Passwords").
$config['password_driver'] = 'httpapi';
$config['password_httpapi_url'] = 'http://127.0.0.1:8026/change';
$config['password_httpapi_method'] = 'POST';
$config['password_httpapi_var_user'] = 'user';
$config['password_httpapi_var_curpass'] = 'curpass';
$config['password_httpapi_var_newpass'] = 'newpass';
$config['password_httpapi_expect'] = '/^ok$/';
// A refusal (4xx) is "could not save", not "cannot connect".
$config['password_http_client'] = ['http_errors' => false, 'timeout' => 30];
$config['password_confirm_current'] = true;
$config['password_minimum_length'] = 12;

// Out-of-office in the settings; replies go once per sender per week (Sieve's vacation default).
$config['managesieve_vacation'] = 1;
