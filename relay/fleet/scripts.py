"""The fleet's Lua scripts: each decision about a shared limit is one script, atomic in Redis, so no
two relays can both take the last slot. Time comes from Redis (``TIME``) inside them, so the relays'
clocks do not have to agree. The keys they use are listed in relay/fleet/__init__.py.
"""

from __future__ import annotations

#: The pacing window, as in relay.delivery.pacing.PACING_WINDOW (Exchange's minute plus a second of margin).
RATE_WINDOW_MS = 61_000
DAY_MS = 86_400_000

# Returns 1 (a slot leased), 0 (none free) or 2: leased, but the registry is not complete yet (a new
# or restarted Redis: not every relay has written its leases again), so this relay keeps to its
# fallback share (ARGV[5] sessions of its own, ARGV[6] its instance id) until it is.
SLOT_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local epoch = redis.call('GET', KEYS[3])
local forming = (not epoch) or now < tonumber(epoch)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= limit then
    redis.call('SET', KEYS[4], ARGV[6], 'PX', 2000)  -- someone waits: idle sessions give their slot back
    return 0
  end
  if forming then
    local own = 0
    local mine = ARGV[6] .. '/'
    for _, lease in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
      if string.sub(lease, 1, #mine) == mine then own = own + 1 end
    end
    if own >= tonumber(ARGV[5]) then return 0 end
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('SADD', KEYS[2], ARGV[4])
if forming then return 2 end
return 1
"""

# Renews the leases of sessions this relay has open. A lease that expired (Redis was away, or
# restarted empty) is written again: the session exists, and the registry should say so.
SLOT_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
"""

# The registry's epoch: the time from which every live relay has written its leases. Missing (a new
# or restarted Redis): it starts now and is complete one grace period later. Returns the ms left.
EPOCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = now + tonumber(ARGV[1])
  redis.call('SET', KEYS[1], epoch)
end
return math.max(tonumber(epoch) - now, 0)
"""

# A submission starts: at most ARGV[2] in the window, at most ARGV[5] recipients a day.
# Returns {1, 0, ''} or {0, ms to wait, why}.
RATE_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_minute = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if per_minute > 0 and redis.call('ZCARD', KEYS[1]) >= per_minute then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now, 'per_minute'}
end
local minute = math.floor(now / 60000)
if budget > 0 then
  local flat = redis.call('HGETALL', KEYS[2])
  local used = 0
  local buckets = {}
  for i = 1, #flat, 2 do
    local m, c = tonumber(flat[i]), tonumber(flat[i + 1])
    if m <= minute - 1440 then
      redis.call('HDEL', KEYS[2], flat[i])
    else
      used = used + c
      table.insert(buckets, {m, c})
    end
  end
  if used > 0 and used + n > budget then
    table.sort(buckets, function(a, b) return a[1] < b[1] end)
    local left = used
    for _, b in ipairs(buckets) do
      left = left - b[2]
      if left + n <= budget then
        return {0, (b[1] + 1441) * 60000 - now, 'recipients_per_day'}
      end
    end
    return {0, DAY, 'recipients_per_day'}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], window * 2)
if n > 0 then
  redis.call('HINCRBY', KEYS[2], minute, n)
  redis.call('PEXPIRE', KEYS[2], DAY + 120000)
end
redis.call('SADD', KEYS[3], ARGV[6])
return {1, minute, ''}
""".replace("DAY", str(DAY_MS))

# A submission ended: its minute counts from now (Exchange counts at acceptance, which lies between
# our start and our end).
RATE_DONE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""

# A submission that never reached Exchange (no session slot after all): give back its place.
RATE_CANCEL = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 and tonumber(ARGV[2]) > 0 then
  local rest = redis.call('HINCRBY', KEYS[2], ARGV[3], -tonumber(ARGV[2]))
  if rest <= 0 then redis.call('HDEL', KEYS[2], ARGV[3]) end
end
return 1
"""

# A hold or pause found by one relay, for all. A hold outranks a pause; a pause only grows.
BLOCK_SET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind = ARGV[1]
local ttl = tonumber(ARGV[6])
local old = redis.call('HGET', KEYS[1], 'kind')
if old == 'hold' and kind == 'pause' then return 0 end
if old == 'pause' and kind == 'pause' and redis.call('PTTL', KEYS[1]) >= ttl then return 0 end
local since = redis.call('HGET', KEYS[1], 'since')
if not since or old ~= kind then since = tostring(now) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'kind', kind, 'reason', ARGV[2], 'reply', ARGV[3], 'hint', ARGV[4],
           'by', ARGV[5], 'since', since, 'until', tostring(now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""
