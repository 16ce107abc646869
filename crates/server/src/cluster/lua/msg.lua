-- A chat message -> {seq, epoch, outcome} (see `message` in lib.lua).
local a = args{'room', 'client_id', 'content', 'prefix', 'suffix', 'max_len', 'ttl_s',
  'epoch_candidate', 'dedup_window_s'}
return message(a)
