-- exists.lua — whether hash KEYS[1] has field ARGV[1]: a read for edge checks.
-- KEYS: 1 a hash
-- ARGV: 1 a field
-- Reply: 1 | 0
-- Redis answers this with a plain HEXISTS (not a script call); the embedded engine, which
-- only runs scripts, runs this file instead.

return redis.call('HEXISTS', KEYS[1], ARGV[1])
