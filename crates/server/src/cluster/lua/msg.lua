-- A chat message -> {seq, epoch, outcome} (see `message` in lib.lua).
local a = args{'room', 'client_id', 'content', 'prefix', 'suffix', 'max_len', 'ttl_s',
  'epoch_candidate', 'dedup_window_s'}
-- `args` checks the count; `message`'s parameters are these ARGV in order, as in msgs.lua.
return message(unpack(ARGV))
