-- Several chat messages, of one room or many, in one call (a node's group commit) -> one reply
-- per message, in order: msg.lua's {seq, epoch, outcome}, or {0, '', 3, error} for a message
-- that failed on its own (what the others did stands, as in a pipeline of msg.lua calls; an
-- error reply nested in the array would fail the whole call on the client). The
-- run-id check (`generation`), Redis's clock and the event count are paid once per call.
-- KEYS: the first message's keys as lib.lua names them, then for each further message its
-- room keys in the order of `room_keys` (`cluster::keys::BATCH_ROOM_KEYS`); ARGV: each
-- message's arguments in turn, as msg.lua names them.
local room_keys = {'seq', 'epoch', 'log', 'channel', 'dedup', 'room_gen'}
-- Each message's ARGV, in the order of `message`'s parameters (lib.lua).
local names = {'room', 'client_id', 'content', 'prefix', 'suffix', 'max_len', 'ttl_s',
  'epoch_candidate', 'dedup_window_s'}
local per = #names
local n = #ARGV / per
if n < 1 or n ~= math.floor(n) or #KEYS ~= 17 + (n - 1) * #room_keys then
  error('msgs: ' .. #KEYS .. ' KEYS and ' .. #ARGV .. ' ARGV do not make a batch')
end
local out = {}
for i = 1, n do
  if i > 1 then
    local at = 17 + (i - 2) * #room_keys
    for j, name in ipairs(room_keys) do K[name] = KEYS[at + j] end
    -- Not a message's keys: using one of the first message's would be a bug.
    K.users, K.presence, K.active = nil, nil, nil
  end
  local b = (i - 1) * per
  local ok, reply = pcall(message, unpack(ARGV, b + 1, b + per))
  if ok then
    out[i] = reply
  else
    local why = reply
    if type(reply) == 'table' then why = reply.err end
    out[i] = {0, '', 3, tostring(why)}
  end
end
return out
