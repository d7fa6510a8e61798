-- index.lua — the global code index (digest -> SKU) for redemptions that name no SKU, and
-- the registry of SKUs. Neither changes inventory; both live outside any SKU's hash slot.
-- KEYS: 1 an index shard (HASH, chosen by the digest's first hex digit) or the registry (SET)
-- ARGV: 'get', digest                      Reply: {sku or '', ready ('1'|'0')}
--     | 'set', digest, sku, digest, sku …  Reply: number of new entries
--     | 'del', digest, sku, digest, sku …  Reply: number of entries removed (each only while
--                                          it still names that SKU; for a re-keyed index)
--     | 'since', token                     Reply: {complete ('1'|'0'), token of the shard's
--                                          rebuild (set to `token` unless one is set)}
--     | 'ready', token                     Reply: 1 if the shard is marked complete, 0 if it
--                                          lost its data since `token` was set
--     | 'ready?'                           Reply: 1 if the shard is marked complete, else 0
--     | 'register', sku, sku …             Reply: number of SKUs new to the registry
--     | 'list'                             Reply: every registered SKU
-- A shard is complete once the gateway indexed every SKU's codes into it; the mark (field
-- READY, which no hex digest can equal) goes with the shard when the engine loses its data,
-- so "no such code" is never answered from an index still being rebuilt. A rebuild names
-- the shard's data it starts from (field SINCE) before it indexes anything, and marks the
-- shard complete only while that name is still there: a loss in between took the name
-- with the entries, and the next rebuild starts over.
-- The prelude's K names do not apply here: this script is not per-SKU.

local READY, SINCE = '_ready', '_since'
local op = ARGV[1]
if op == 'get' then
  local r = redis.call('HMGET', KEYS[1], ARGV[2], READY)
  return { r[1] or '', r[2] or '0' }
elseif op == 'set' then
  -- One multi-value HSET per slice of pairs (Lua's `unpack` cannot spread many more).
  local added = 0
  for i = 2, #ARGV, 4000 do
    added = added + redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
  end
  return added
elseif op == 'del' then
  local removed = 0
  for i = 2, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
      removed = removed + redis.call('HDEL', KEYS[1], ARGV[i])
    end
  end
  return removed
elseif op == 'since' then
  if redis.call('HEXISTS', KEYS[1], READY) == 1 then return { '1', '' } end
  redis.call('HSETNX', KEYS[1], SINCE, ARGV[2])
  return { '0', redis.call('HGET', KEYS[1], SINCE) }
elseif op == 'ready' then
  if redis.call('HGET', KEYS[1], SINCE) ~= ARGV[2] then return 0 end
  redis.call('HSET', KEYS[1], READY, '1')
  return 1
elseif op == 'ready?' then
  return redis.call('HEXISTS', KEYS[1], READY)
elseif op == 'register' then
  local added = 0
  for i = 2, #ARGV, 4000 do
    added = added + redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
  end
  return added
elseif op == 'list' then
  return redis.call('SMEMBERS', KEYS[1])
end
return redis.error_reply('index.lua: unknown op')
