-- A connection joins -> {head, epoch, announced, people, users (while people <= users_max),
-- history, truncated, recovered (-1 none / 0 / 1)}: presence +1 on the node and in the cluster, the `join` event
-- when this is the user's first connection anywhere (and the room is small), then the head and
-- the joiner's history, all in one atomic step.
local a = args{'room', 'user', 'node', 'since', 'since_epoch', 'on_join', 'max_replay',
  'announce_max', 'users_max', 'prefix', 'suffix', 'max_len', 'ttl_s', 'epoch_candidate',
  'presence_ttl_ms'}
local e = epoch_of(a.epoch_candidate, a.room)
local c, people = add(a.room, a.user, a.node, 1)
-- The node is alive as of now: its heartbeat key is refreshed, but not made again. A key that
-- expired is the heartbeat's to find (`SET ... GET` answers nil): the node may have been reaped
-- meanwhile, and only then does it put its presence back. Made here, it hid that (a node
-- resuming from SIGSTOP joined its reconnecting clients before its heartbeat ran, and the
-- users reaped during the pause stayed absent).
redis.call('SET', K.alive, 1, 'PX', a.presence_ttl_ms, 'XX')
local announced = 0
if announce(c == 1, true, people, a.announce_max) then
  -- Retention after the history is read, as one node does it (at the end of the commit).
  add_event(e, a.prefix, a.suffix, a.ttl_s)
  announced = 1
end
local head = tonumber(redis.call('GET', K.seq) or '0')
local users = {}
if people <= tonumber(a.users_max) then users = redis.call('HKEYS', K.users) end
local hist, truncated, recovered = nil, 0, -1
if a.since ~= '' then
  recovered = 0
  local since = tonumber(a.since)
  if since and a.since_epoch == e and since <= head then
    local first = redis.call('XRANGE', K.log, '-', '+', 'COUNT', 1)
    local ok
    if #first > 0 then
      ok = since + 1 >= entry_seq(first[1][1])
    else
      ok = since == head
    end
    if ok then
      local max_replay = tonumber(a.max_replay)
      local got = redis.call('XRANGE', K.log, '(' .. fmt(since) .. '-0', '+',
        'COUNT', max_replay + 1)
      hist = frames(got)
      if #hist > max_replay then hist[#hist] = nil; truncated = 1 end
      recovered = 1
    end
  end
end
if not hist then
  hist = {}
  local on_join = tonumber(a.on_join)
  if on_join > 0 then
    local f = frames(redis.call('XREVRANGE', K.log, '+', '-', 'COUNT', on_join))
    for i = #f, 1, -1 do hist[#hist + 1] = f[i] end
  end
end
retain(a.max_len, a.ttl_s)
return {head, e, announced, people, users, hist, truncated, recovered}
