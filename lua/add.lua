-- add.lua — add a chunk of codes to a SKU's inventory (import and warm-up).
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 now (ms), then per code 4 values: key id (decimal; '' = next from the SKU's sequence),
--       digest (keyed), code (sealed for its key id), expires_at (ms, '0' = never)
-- Reply: one entry per code: its key id if added, or '=' .. the existing key id if a code
--        with that digest is already there (nothing changes for it) | {'no_sku'}
-- Callers keep chunks to a few hundred codes so no single call blocks the engine.

local now = tonumber(ARGV[1])
local settings = redis.call('HMGET', K.meta, 'max_issues', 'max_uses')
if not settings[1] then return { 'no_sku' } end
local max_issues, max_uses = tonumber(settings[1]), tonumber(settings[2])

local reply, added = {}, {}
for i = 2, #ARGV, 4 do
  local id, digest, code, expires_at = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local existing = redis.call('HGET', K.idx, digest)
  if existing then
    reply[#reply + 1] = '=' .. existing
  else
    if id == '' then
      id = tostring(redis.call('HINCRBY', K.meta, 'seq', 1))
    elseif tonumber(id) > tonumber(redis.call('HGET', K.meta, 'seq') or '0') then
      -- Ids chosen by the ledger: later allocations must not reuse them.
      redis.call('HSET', K.meta, 'seq', id)
    end
    local k = {
      void = false, held = 0, sold = 0, uses = 0, max_issues = max_issues, max_uses = max_uses,
      expires_at = expires_at, redeemer = '', redeemed_at = 0, listed = false,
    }
    redis.call('HSET', K.idx, digest, id)
    redis.call('HSET', K.codes, id, code)
    save_key(id, snapshot(nil), k)
    reply[#reply + 1] = id
    added[#added + 1] = id
  end
end
if #added > 0 then emit('add', now, { 'ids', table.concat(added, ',') }) end
return reply
