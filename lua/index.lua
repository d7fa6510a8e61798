-- index.lua — the global code index (digest -> SKU) for redemptions that name no SKU, and
-- the registry of SKUs. Neither changes inventory; both live outside any SKU's hash slot.
-- KEYS: 1 an index shard (HASH, chosen by the digest's first hex digit) or the registry (SET)
-- ARGV: 'get', digest                      Reply: sku | nil
--     | 'set', digest, sku, digest, sku …  Reply: number of new entries
--     | 'register', sku                    Reply: 1 if new, else 0
--     | 'list'                             Reply: every registered SKU
-- The prelude's K names do not apply here: this script is not per-SKU.

local op = ARGV[1]
if op == 'get' then
  return redis.call('HGET', KEYS[1], ARGV[2])
elseif op == 'set' then
  local added = 0
  for i = 2, #ARGV, 2 do
    added = added + redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  return added
elseif op == 'register' then
  return redis.call('SADD', KEYS[1], ARGV[2])
elseif op == 'list' then
  return redis.call('SMEMBERS', KEYS[1])
end
return redis.error_reply('index.lua: unknown op')
