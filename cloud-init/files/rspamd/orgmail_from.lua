-- orgmail: authenticated mail may show in From:/Sender: only addresses its login may send as,
-- by Postfix's smtpd_sender_login_maps (address -> logins); refused before signing. The map: the single
-- host's orgmail-sync writes it from the stack's config, a cluster edge's orgmail-senders from the directory.
local senders = rspamd_config:add_map({type = "map", url = "/etc/postfix/orgmail/senders",
  description = "orgmail senders"})

local function may_send(login, addr)
  for l in ((senders and senders:get_key(addr:lower())) or ""):gmatch("[^,%s]+") do
    if l:lower() == login then return true end
  end
  return false
end

-- Every address-like word, raw and decoded (display names, comments, encoded words); an "@"
-- outside such a word cannot be checked, so it counts as foreign too.
local function foreign(login, h)
  for _, text in ipairs({h.value or "", h.decoded or ""}) do
    local words = 0
    for addr in text:gmatch("[%w.!#$%%&'*+/=?^_`{|}~-]+@[%w.-]+") do
      words = words + 1
      addr = addr:gsub("%.+$", "")
      if not may_send(login, addr) then return addr end
    end
    local _, ats = text:gsub("@", "")
    if ats ~= words then return text end
  end
end

rspamd_config:register_symbol({
  name = "ORGMAIL_FROM_NOT_OWNED", type = "prefilter", priority = 10,
  callback = function(task)
    local login = task:get_user()
    if not login then return end
    login = login:lower()
    -- No map read yet (a new edge before orgmail-senders' first export): nobody's From: can be
    -- checked, so authenticated mail waits (4xx) rather than leave signed unchecked or bounce.
    if not senders or senders:get_nelts() == 0 then
      task:set_pre_result({action = "soft reject", module = "orgmail",
        message = "Sender addresses not loaded yet, try again later"})
      return
    end
    local why
    local froms = task:get_header_full("From") or {}
    local parsed = task:get_from("mime") or {}
    local senderh = task:get_header_full("Sender") or {}
    if #froms ~= 1 or #parsed ~= 1 or (parsed[1].addr or "") == "" or #senderh > 1 then
      why = "Mail needs exactly one From: address and at most one Sender:"
    elseif not may_send(login, parsed[1].addr) then
      why = "From: " .. parsed[1].addr
    else
      for _, h in ipairs({froms[1], senderh[1]}) do
        local bad = not why and foreign(login, h)
        if bad then why = h.name .. ": " .. bad end
      end
    end
    if why then
      if not why:find("^Mail") then why = why .. " is not an address " .. login .. " may send as" end
      task:set_pre_result({action = "reject", message = why, module = "orgmail"})
    end
  end,
})
