-- A dead node's connections of one user (KEYS name the dead node) -> leave seq or 0: removes
-- them all, announcing the leave if they were the user's last connections anywhere.
local a = args{'room', 'user', 'count', 'announce_max', 'prefix', 'suffix', 'max_len', 'ttl_s'}
local last, after = remove(a.room, a.user, tonumber(a.count))
if announce(last, false, after, a.announce_max) then
  local e = room_epoch()
  if e then return append(e, a.prefix, a.suffix, a.max_len, a.ttl_s) end
end
return 0
