-- A dead node's connections of one user (KEYS name the dead node) -> leave seq or 0: removes
-- them all, announcing the leave if they were the user's last connections anywhere.
-- Nothing while the node's heartbeat key is back: a reap of many rooms takes a while, and a
-- node that resumed meanwhile (SIGSTOP, a cut link) has already put its entries back (or is
-- doing so); removing them now would leave its users absent for good.
local a = args{'room', 'user', 'count', 'announce_max', 'prefix', 'suffix', 'max_len', 'ttl_s'}
if redis.call('EXISTS', K.alive) == 1 then return 0 end
local last, after = remove(a.room, a.user, tonumber(a.count))
if announce(last, false, after, a.announce_max) then
  local e = room_epoch()
  if e then return append(e, a.prefix, a.suffix, a.max_len, a.ttl_s) end
end
return 0
