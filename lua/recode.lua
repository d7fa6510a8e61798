-- recode.lua — keys' codes sealed anew (another data key) and their digests keyed anew
-- (another index key, or a plaintext ledger migrated): `kamigate rekey`. Nothing else about
-- a key changes, and no event is written: the ledger is recoded by the same pass.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: per key 4 values: key id, old digest, new digest, sealed code
-- Reply: {'recoded', number of keys the engine has and recoded} | {'no_sku'}
-- A key the engine lacks is skipped: warming it later loads it from the ledger, recoded.
-- Every sealed form of a key opens to the same code, so writing one over another is safe
-- whatever a concurrent claim reads.

if redis.call('EXISTS', K.meta) == 0 then return { 'no_sku' } end
local recoded = 0
for i = 1, #ARGV, 4 do
  local id, old, new, code = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HEXISTS', K.keys, id) == 1 then
    redis.call('HSET', K.codes, id, code)
    if old ~= new then
      if redis.call('HGET', K.idx, old) == id then redis.call('HDEL', K.idx, old) end
      redis.call('HSET', K.idx, new, id)
    end
    recoded = recoded + 1
  end
end
return { 'recoded', recoded }
