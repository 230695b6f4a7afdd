"""The Lua scripts of :mod:`farmesh_ws.state.redis_store`, each run atomically by Redis.

Each reads the Redis clock (TIME), so deadlines and refills agree across skewed hosts.
"""

_NOW_MS = "local clock = redis.call('TIME')\n"

UPSERT_SESSION = (
    _NOW_MS
    + """
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
local deadline = string.format('%d', now_ms + ARGV[2])
redis.call('HSET', KEYS[1], 'process_id', ARGV[3], 'wallet', ARGV[4], 'model_id', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], deadline)
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%d', now_ms))
return 1
"""
)

COUNT_SESSIONS = (
    _NOW_MS
    + """
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
return redis.call('ZCOUNT', KEYS[1], string.format('%d', now_ms), '+inf')
"""
)

SWAP_VALUE = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
end
return 1
"""

TAKE_TOKENS = (
    _NOW_MS
    + """
local now_ms = clock[1] * 1000 + clock[2] / 1000
local rate_per_ms = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at_ms')
local tokens = burst
if state[1] then
  local elapsed_ms = math.max(0, now_ms - tonumber(state[2]))
  tokens = math.min(burst, tonumber(state[1]) + elapsed_ms * rate_per_ms)
end
local allowed, wait_ms = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait_ms = (cost - tokens) / rate_per_ms
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'at_ms', string.format('%.17g', now_ms))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((burst - tokens) / rate_per_ms) + 1))
return {allowed, string.format('%.17g', wait_ms)}
"""
)
