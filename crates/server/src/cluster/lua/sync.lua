-- Sets this node's connection count of one user to `target` (what the node really has, after
-- Redis trouble lost a leave or a join's answer, or a survivor reaped a node that was only cut
-- off) -> seq of the announced join or leave this makes, or 0.
local a = args{'room', 'user', 'node', 'target', 'announce_max', 'join_prefix', 'join_suffix',
  'leave_prefix', 'leave_suffix', 'max_len', 'ttl_s'}
local target = tonumber(a.target)
local n = tonumber(redis.call('HGET', K.presence, a.user) or '0')
local e = room_epoch()
if target > n then
  local c, people = add(a.room, a.user, a.node, target - n)
  if announce(c == target - n, true, people, a.announce_max) and e then
    return append(e, a.join_prefix, a.join_suffix, a.max_len, a.ttl_s)
  end
elseif target < n then
  local last, after = remove(a.room, a.user, n - target)
  if announce(last, false, after, a.announce_max) and e then
    return append(e, a.leave_prefix, a.leave_suffix, a.max_len, a.ttl_s)
  end
end
return 0
