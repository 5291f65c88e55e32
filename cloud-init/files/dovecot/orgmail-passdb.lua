-- Dovecot passdb for orgmail: checks the password against the bcrypt hash in
-- /etc/dovecot/orgmail-users (written by orgmail-sync) itself, and returns no
-- password. Dovecot's auth cache then keeps a fast hash of the password that
-- last succeeded, so a repeated login costs no bcrypt check; a wrong password
-- for a cached user is checked against the file (and bcrypt) again.
-- A passwd-file passdb would hand the bcrypt hash to the cache, and every
-- cache hit would verify bcrypt again.

local USERS = "/etc/dovecot/orgmail-users"

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

function auth_passdb_get_cache_key()
  return "%{user}"
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
