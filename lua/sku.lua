-- sku.lua — create or update a SKU's settings, or read them.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 'put', config JSON, per_user_limit (0 = none), allow_late ('1'|'0'), max_issues,
--       max_uses, now (ms)                       Reply: {'created'} | {'updated'}
--     | 'get'                                    Reply: {config JSON} | {'no_sku'}
--     | 'epoch'                                  Reply: {epoch or ''} | {'no_sku'}
--     | 'mark', epoch                            Reply: {'marked'} | {'no_sku'}
-- The epoch is a marker the gateway writes into both the engine and the ledger when they
-- agree; an engine whose marker differs from the ledger's was replaced behind the gateway's
-- back (e.g. Redis restarted from an older snapshot) and is reconciled.
-- max_issues and max_uses are recorded on each key when it is added: a change applies to
-- codes added afterwards.

local op = ARGV[1]
if op == 'epoch' or op == 'mark' then
  if redis.call('EXISTS', K.meta) == 0 then return { 'no_sku' } end
  if op == 'mark' then
    redis.call('HSET', K.meta, 'epoch', ARGV[2])
    return { 'marked' }
  end
  return { redis.call('HGET', K.meta, 'epoch') or '' }
end
if op == 'get' then
  local config = redis.call('HGET', K.meta, 'config')
  if not config then return { 'no_sku' } end
  return { config }
end

local now = tonumber(ARGV[7])
local created = redis.call('HSETNX', K.meta, 'created_at', now) == 1
redis.call('HSET', K.meta, 'config', ARGV[2], 'per_user_limit', ARGV[3], 'allow_late', ARGV[4],
  'max_issues', ARGV[5], 'max_uses', ARGV[6], 'updated_at', now)
emit('sku', now, { 'op', created and 'create' or 'update' })
return { created and 'created' or 'updated' }
