-- exists.lua — a plain read of hash KEYS[1] for edge checks: whether it has field ARGV[1],
-- or with ARGV[2] = 'get', that field's value.
-- KEYS: 1 a hash
-- ARGV: 1 a field, 2 'get' to read the value (optional)
-- Reply: 1 | 0, or the value | nil
-- Redis answers these with a plain HEXISTS or HGET (not a script call); the embedded engine,
-- which only runs scripts, runs this file instead.

if ARGV[2] == 'get' then return redis.call('HGET', KEYS[1], ARGV[1]) end
return redis.call('HEXISTS', KEYS[1], ARGV[1])
