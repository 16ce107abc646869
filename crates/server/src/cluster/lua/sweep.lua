-- Forgets the room when it is empty -> 1 forgotten, 0 kept. Empty: no member anywhere in the
-- cluster, no `message` event in its log (join/leave events alone do not keep it), and so for
-- empty_ttl_s since it was last known in use (K.active: its last member left, or a sweep found
-- it in use). Its head, epoch (and the epoch's generation), log and mark go, and it leaves the shard's room set; a later
-- join starts it afresh with a new epoch. Idempotent: every node sweeps every room of every
-- shard, in any order.
local a = args{'room', 'empty_ttl_s'}
if redis.call('HLEN', K.users) > 0 then return 0 end
if redis.call('SISMEMBER', K.rooms, a.room) == 0 then
  -- Already forgotten (another node's pass got there first): leave nothing behind.
  redis.call('DEL', K.active, K.room_gen)
  return 0
end
local now = now_ms()
local since = tonumber(redis.call('GET', K.active) or '')
if not since then
  -- Never marked (a room from before marks existed): in use as of now.
  redis.call('SET', K.active, fmt(now))
  return 0
end
if now - since < tonumber(a.empty_ttl_s) * 1000 then return 0 end
-- Frames are encoded with `type` first. Bounded: the log holds at most history.max_len.
local start = '-'
while true do
  local got = redis.call('XRANGE', K.log, start, '+', 'COUNT', 100)
  for _, f in ipairs(frames(got)) do
    if string.sub(f, 1, 17) == '{"type":"message"' then
      redis.call('SET', K.active, fmt(now))
      return 0
    end
  end
  if #got < 100 then break end
  start = '(' .. got[#got][1]
end
redis.call('DEL', K.seq, K.epoch, K.log, K.active, K.room_gen)
redis.call('SREM', K.rooms, a.room)
return 1
