-- Drops the room's events older than ttl_s (before a history read) -> 0.
local a = args{'ttl_s'}
trim(a.ttl_s)
return 0
