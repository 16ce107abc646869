-- A chat message -> {seq, epoch, outcome} (see `message` in lib.lua).
local a = args{'room', 'client_id', 'content', 'prefix', 'suffix', 'max_len', 'ttl_s',
  'epoch_candidate', 'dedup_window_s'}
return message(a.room, a.client_id, a.content, a.prefix, a.suffix, a.max_len, a.ttl_s,
  a.epoch_candidate, a.dedup_window_s)
