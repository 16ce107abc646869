-- A connection leaves -> {leave seq or 0, head}: presence -1, the `leave` event after the
-- user's last connection anywhere (when the room is small).
local a = args{'room', 'user', 'announce_max', 'prefix', 'suffix', 'max_len', 'ttl_s'}
local last, after = remove(a.room, a.user, 1)
local head = tonumber(redis.call('GET', K.seq) or '0')
if announce(last, false, after, a.announce_max) then
  local e = room_epoch()
  if e then
    local seq = append(e, a.prefix, a.suffix, a.max_len, a.ttl_s)
    return {seq, seq}
  end
end
return {0, head}
