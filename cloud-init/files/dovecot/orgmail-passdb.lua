-- Dovecot passdb for orgmail: checks the password against the bcrypt hash in
-- /etc/dovecot/orgmail-users (written by orgmail-sync) itself, and returns no
-- password. Dovecot's auth cache then keeps a fast hash of the password that
-- last succeeded, so a repeated login costs no bcrypt check; a wrong password
-- for a cached user is checked against the file (and bcrypt) again.
-- A passwd-file passdb would hand the bcrypt hash to the cache, and every
-- cache hit would verify bcrypt again.

local USERS = "/etc/dovecot/orgmail-users"
-- Users whose password is still the one from the configuration (orgmail:webmail.requirePasswordChange):
-- it logs in to webmail (on this host, from loopback) only, where they must change it first.
local INITIAL = "/etc/dovecot/orgmail-initial"

local function stored_hash(user)
  local file = io.open(USERS, "r")
  if file == nil then
    return nil, "cannot read " .. USERS
  end
  for line in file:lines() do
    local name, hash = line:match("^([^:]*):([^:]*):")
    if name == user then
      file:close()
      return hash, nil
    end
  end
  file:close()
  return nil, nil
end

local function initial(user)
  local file = io.open(INITIAL, "r")
  if file == nil then
    return false
  end
  for line in file:lines() do
    if line == user then
      file:close()
      return true
    end
  end
  file:close()
  return false
end

-- Webmail connects from 127.0.0.1. Only that address: the cache key below must tell the same two apart.
local function webmail(ip)
  return ip == "127.0.0.1"
end

-- Webmail's logins are cached apart from everyone else's: a webmail login with an initial password
-- must not let the same password in from a mail client as a cache hit.
function auth_passdb_get_cache_key()
  return "%{user}\t%{remote_ip | if('eq', '127.0.0.1', 'webmail', 'client')}"
end

function auth_password_verify(req, password)
  local hash, err = stored_hash(req.user)
  if err ~= nil then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, err
  end
  if hash == nil or hash == "" then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
  end
  local ok, verify_error = req:password_verify(hash, password)
  if ok == 1 then
    -- Only after the password matched: a guesser learns nothing of who has changed theirs.
    -- IMAP answers "NO [EXPIRED] Password expired"; not a failed login to fail2ban.
    if not webmail(req.remote_ip) and initial(req.user) then
      return dovecot.auth.PASSDB_RESULT_PASS_EXPIRED, "change the initial password in webmail first"
    end
    return dovecot.auth.PASSDB_RESULT_OK, {}
  end
  if ok < 0 then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, verify_error
  end
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, "password mismatch"
end

function script_init()
  return 0
end
