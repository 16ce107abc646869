-- Shared by every op script (each script is this file followed by one op file; see
-- cluster/script.rs). Contract with the Rust side:
-- * KEYS are named by `keys{...}` below, in the order of `cluster::keys::ScriptKeys`;
-- * each op file names its ARGV with `args{...}`, in the order of its Rust `*Args` struct;
-- * replies are arrays in the field order of the Rust `*Reply` struct; script.rs wraps each
--   op in a function and answers {op's reply, the shard's event count (K.events)};
-- * the last ARGV is the most events the calling node has seen the shard hold; it is taken
--   off here, before the op names its own.
-- * A batch (msgs.lua, several messages of any rooms in one call; script.rs sets BATCH for
--   it) has the first message's keys named as above, then each further message's room keys
--   (`cluster::keys::BATCH_ROOM_KEYS`), and each message's ARGV in turn.
-- Unit tests compare both name lists with the Rust structs; tests/cluster_scripts.rs runs
-- every op against a real redis-server through the structs.
local function named(values, names, at)
  local out = {}
  for i, name in ipairs(names) do out[name] = values[at + i] end
  return out
end
local function exactly(values, names, what)
  if #values ~= #names then
    error(what .. ': expected ' .. #names .. ', got ' .. #values)
  end
  return named(values, names, 0)
end
local function keys(names)
  if BATCH then return named(KEYS, names, 0) end
  return exactly(KEYS, names, 'KEYS')
end
local events_seen = tonumber(table.remove(ARGV)) or 0
local function args(names) return exactly(ARGV, names, 'ARGV') end
local K = keys{'seq', 'epoch', 'log', 'users', 'channel', 'rooms', 'nodes', 'presence',
  'node_rooms', 'alive', 'dedup', 'room_gen', 'run', 'durable', 'gen', 'active', 'events'}

local function fmt(n) return string.format('%d', n) end
-- Redis may come back with less than it acknowledged (restarted from an older snapshot, AOF
-- everysec, a failover to a lagging replica) and the same epochs. Every Redis process has its
-- own run id: when it differs from the one the data was written under (K.run), writes may have
-- been lost, unless a node had found that run durable (K.durable: AOF with appendfsync always,
-- a master without replicas). Then the shard's generation (K.gen) goes up, and a room whose
-- epoch is of an older generation gets a new one, its seq going on from what Redis has: no
-- two different events ever share (room, epoch, seq).
-- The run id cannot tell an older snapshot of a durable run, restored with the AOF on again,
-- from a plain restart: the nodes can. Every event counts in K.events, and each node passes
-- the most it has seen the shard hold (events_seen): fewer now means events were lost, and
-- the generation goes up just the same. K.events then goes on from what the node saw, so the
-- other nodes do not renew the epochs again for the same loss.
-- Checked once per script call (the answer is kept for the rest of the call, which no restart
-- can interrupt): a batch of messages pays for `INFO server` once, not per message.
local checked_gen, checked_run = nil, nil
local function generation()
  if checked_gen then return checked_gen, checked_run end
  local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or ''
  local was = redis.call('GET', K.run)
  local lost = false
  if was ~= run then
    if was then
      -- Lossless only if `was` ran durably AND this process replayed its append-only file: a
      -- process without AOF loaded a snapshot, which may be older (a restored backup).
      local aof = string.match(redis.call('INFO', 'persistence'), 'aof_enabled:(%d)')
      local durable = redis.call('SREM', K.durable, was) == 1
      lost = not (durable and aof == '1')
    end
    redis.call('SET', K.run, run)
  end
  if events_seen > tonumber(redis.call('GET', K.events) or '0') then
    redis.call('SET', K.events, fmt(events_seen))
    lost = true
  end
  if lost then redis.call('INCR', K.gen) end
  checked_gen, checked_run = redis.call('GET', K.gen) or '0', run
  return checked_gen, checked_run
end
-- The room's epoch (nil when it has none), renewed first if Redis may have lost some of its
-- events since it was made; and the generation.
local function room_epoch()
  local got = redis.call('MGET', K.epoch, K.room_gen)
  local e, room_gen = got[1], got[2]
  local gen, run = generation()
  if e and (room_gen or '0') ~= gen then
    local renewed = string.sub(run, 1, 8)
    if renewed == e then renewed = string.sub(run, 9, 16) end
    e = renewed
    redis.call('SET', K.epoch, e)
    redis.call('SET', K.room_gen, gen)
  end
  return e, gen
end
-- The room's epoch, made from `candidate` when it has none: then its seq starts at 0 and the
-- room joins the shard's room set (a room with an epoch is always in the set, and the sweep
-- takes both away together, so a room's later messages need not add it again).
local function epoch_of(candidate, room)
  local e, gen = room_epoch()
  if not e then
    e = candidate
    redis.call('SET', K.epoch, e)
    redis.call('SET', K.seq, 0)
    redis.call('SET', K.room_gen, gen)
    redis.call('SADD', K.rooms, room)
  end
  return e
end
-- Redis's clock, read once per script call (and formatted once, for the events' `t`).
local clock, clock_s = nil, nil
local function now_ms()
  if not clock then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock
end
local function now_s()
  if not clock_s then clock_s = fmt(now_ms()) end
  return clock_s
end
local function entry_seq(id) return tonumber(string.match(id, '^(%d+)')) end
-- The announce rule, as `broker::log::announce` defines it (a table-driven test runs both on
-- the same cases): only a first connection joining or a last leaving is a change, and only
-- while the room, counted in people after the change and including a leaver, has at most
-- announce_max of them.
local function announce(transition, joined, users_after, announce_max)
  local counted = users_after
  if not joined then counted = users_after + 1 end
  return transition and counted <= tonumber(announce_max)
end
-- history.ttl_s: drops the events appended more than ttl seconds ago. They are the oldest
-- entries of the stream (`t` is Redis's clock when each was appended), so this finds the
-- first younger entry and trims everything below it (XTRIM MINID). Bounded work per call.
local function trim(ttl)
  ttl = tonumber(ttl)
  if not ttl or ttl <= 0 then return end
  local cutoff = now_ms() - ttl * 1000
  local last, start = nil, '-'
  for _ = 1, 100 do
    local got = redis.call('XRANGE', K.log, start, '+', 'COUNT', 100)
    local young = false
    for _, ent in ipairs(got) do
      local t = nil
      local fields = ent[2]
      for j = 1, #fields, 2 do
        if fields[j] == 't' then t = tonumber(fields[j + 1]) end
      end
      if not t or t >= cutoff then young = true; break end
      last = ent[1]
    end
    if young or #got < 100 then break end
    start = '(' .. last
  end
  if last then redis.call('XTRIM', K.log, 'MINID', fmt(entry_seq(last) + 1) .. '-0') end
end
-- Retention, as one node applies it at the end of a commit: history.max_len, history.ttl_s.
local function retain(max_len, ttl)
  redis.call('XTRIM', K.log, 'MAXLEN', max_len)
  trim(ttl)
end
-- Events this call stored: K.events goes up by as many when the call ends (`events_now`).
local added = 0
-- The shard's event count after this call.
local function events_now()
  if added > 0 then return redis.call('INCRBY', K.events, added) end
  return redis.call('GET', K.events) or '0'
end
-- Sequences, stores and publishes one event; retention is the caller's, but with `max_len`
-- the stream is cut to it in the same XADD (as `XTRIM MAXLEN` after it would).
local function add_event(e, prefix, suffix, ttl, max_len)
  local seq = redis.call('INCR', K.seq)
  local s = fmt(seq)
  local frame = prefix .. s .. suffix
  if max_len then
    redis.call('XADD', K.log, 'MAXLEN', max_len, s .. '-0', 'f', frame, 'e', e, 't', now_s())
  else
    redis.call('XADD', K.log, s .. '-0', 'f', frame, 'e', e, 't', now_s())
  end
  added = added + 1
  if tonumber(ttl) > 0 then
    -- Every event is older than ttl once the room has been idle that long.
    redis.call('EXPIRE', K.log, ttl)
  end
  redis.call('PUBLISH', K.channel, s .. ' ' .. e .. ' ' .. frame)
  return seq
end
local function append(e, prefix, suffix, max_len, ttl)
  local seq = add_event(e, prefix, suffix, ttl, max_len)
  trim(ttl)
  return seq
end
local function frames(entries)
  local out = {}
  for _, ent in ipairs(entries) do
    local fields = ent[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'f' then out[#out + 1] = fields[j + 1] end
    end
  end
  return out
end
-- Presence: `count` more connections of `user` on the node; returns the user's connections
-- in the cluster and the people in the room after the change.
local function add(room, user, node, count)
  redis.call('HINCRBY', K.presence, user, count)
  local c = redis.call('HINCRBY', K.users, user, count)
  redis.call('SADD', K.node_rooms, room)
  redis.call('SADD', K.nodes, node)
  redis.call('SADD', K.rooms, room)
  return c, redis.call('HLEN', K.users)
end
-- Presence: up to `count` connections of `user` fewer on the node; returns whether that was
-- the user's last connection in the cluster and the people in the room after the change.
local function remove(room, user, count)
  local n = tonumber(redis.call('HGET', K.presence, user) or '0')
  if n <= 0 then return false, redis.call('HLEN', K.users) end
  count = math.min(count, n)
  if n == count then redis.call('HDEL', K.presence, user) else redis.call('HINCRBY', K.presence, user, -count) end
  if redis.call('HLEN', K.presence) == 0 then
    redis.call('SREM', K.node_rooms, room)
  end
  local c = redis.call('HINCRBY', K.users, user, -count)
  if c > 0 then return false, redis.call('HLEN', K.users) end
  redis.call('HDEL', K.users, user)
  local after = redis.call('HLEN', K.users)
  -- The room may be empty from now on (see sweep.lua).
  if after == 0 then redis.call('SET', K.active, fmt(now_ms())) end
  return true, after
end
-- A chat message (msg.lua, and each message of msgs.lua) -> {seq, epoch, outcome}: outcome 0
-- stored now, 1 a resend of the same content under this client id (seq is the original's,
-- nothing stored), 2 the id holds other content (seq 0, nothing stored). The parameters are
-- the message's ARGV in order (the Rust `Msg`'s): a batch passes them straight from ARGV,
-- without a table per message.
local function message(room, client_id, content, prefix, suffix, max_len, ttl_s,
    epoch_candidate, dedup_window_s)
  if client_id ~= '' then
    local orig = redis.call('GET', K.dedup)
    if orig then
      -- Like one node: a message dropped by retention no longer de-duplicates.
      local got = redis.call('XRANGE', K.log, orig .. '-0', orig .. '-0')
      if #got > 0 then
        local e = room_epoch() or ''
        local stored = cjson.decode(frames(got)[1])
        if stored.content == content then return {tonumber(orig), e, 1} end
        return {0, e, 2}
      end
    end
  end
  local e = epoch_of(epoch_candidate, room)
  local seq = append(e, prefix, suffix, max_len, ttl_s)
  if client_id ~= '' then redis.call('SET', K.dedup, seq, 'EX', dedup_window_s) end
  return {seq, e, 0}
end
