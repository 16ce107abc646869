-- A chat message -> {seq, epoch, outcome}: outcome 0 stored now, 1 a resend of the same
-- content under this client id (seq is the original's, nothing stored), 2 the id holds other
-- content (seq 0, nothing stored).
local a = args{'room', 'client_id', 'content', 'prefix', 'suffix', 'max_len', 'ttl_s',
  'epoch_candidate', 'dedup_window_s'}
if a.client_id ~= '' then
  local orig = redis.call('GET', K.dedup)
  if orig then
    -- Like one node: a message dropped by retention no longer de-duplicates.
    local got = redis.call('XRANGE', K.log, orig .. '-0', orig .. '-0')
    if #got > 0 then
      local e = room_epoch() or ''
      local stored = cjson.decode(frames(got)[1])
      if stored.content == a.content then return {tonumber(orig), e, 1} end
      return {0, e, 2}
    end
  end
end
local e = epoch_of(a.epoch_candidate)
local seq = append(e, a.prefix, a.suffix, a.max_len, a.ttl_s)
if a.client_id ~= '' then redis.call('SET', K.dedup, seq, 'EX', a.dedup_window_s) end
redis.call('SADD', K.rooms, a.room)
return {seq, e, 0}
