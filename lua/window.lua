-- window.lua — sliding-window counters and escalating lockouts, shared by every gateway.
-- KEYS: 1 the subject's events (ZSET of timestamps), 2 the subject's lockout (HASH: until,
--       strikes); both carry the subject's hash tag, e.g. kg:lim:{ip:203.0.113.9}:fails
-- ARGV: 'fail', now, member, window ms, max, lockout ms, max lockout ms, strike memory ms
--                                        Reply: {'ok', failures left} | {'locked', ms}
--     | 'take', now, member, window ms, max
--                                        Reply: {'ok', left} | {'limited', retry after ms}
-- 'fail' records a failed attempt; the max-th failure within the window locks the subject
-- out for lockout ms, doubling with every strike remembered (strike memory), capped.
-- 'take' is a plain sliding-window rate limit: at most max events per window.
-- Whether a subject is locked out now is read without a script: the gateway reads the
-- lockout's 'until' with a plain HGET (src/limit/window.rs, `check`).
-- The prelude's K names do not apply here: this script is not per-SKU.

local op, now = ARGV[1], tonumber(ARGV[2])
local events, lock = KEYS[1], KEYS[2]

local function locked_for()
  local until_ms = tonumber(redis.call('HGET', lock, 'until') or '0')
  if until_ms > now then return until_ms - now end
  return nil
end

local member, window = ARGV[3], tonumber(ARGV[4])
local max = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', events, '-inf', now - window)

if op == 'take' then
  local n = redis.call('ZCARD', events)
  if n >= max then
    local oldest = redis.call('ZRANGE', events, 0, 0, 'WITHSCORES')
    local retry = tonumber(oldest[2] or now) + window - now
    return { 'limited', math.max(retry, 1) }
  end
  redis.call('ZADD', events, now, member)
  redis.call('PEXPIRE', events, window)
  return { 'ok', max - n - 1 }
end

if op == 'fail' then
  local left = locked_for()
  if left then return { 'locked', left } end
  redis.call('ZADD', events, now, member)
  redis.call('PEXPIRE', events, window)
  local n = redis.call('ZCARD', events)
  if n < max then return { 'ok', max - n } end
  local lockout, cap, memory = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local strikes = redis.call('HINCRBY', lock, 'strikes', 1)
  local ms = lockout
  for _ = 2, strikes do
    ms = ms * 2
    if ms >= cap then break end
  end
  ms = math.min(ms, cap)
  redis.call('HSET', lock, 'until', now + ms)
  redis.call('PEXPIRE', lock, math.max(ms, memory))
  redis.call('DEL', events)
  return { 'locked', ms }
end

return redis.error_reply('window.lua: unknown op')
