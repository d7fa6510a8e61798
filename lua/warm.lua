-- warm.lua — load keys from the ledger into the engine, each in the state the ledger has.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 the SKU generation this load is for ('' = any), then per key 12 values: key id,
--       digest, canonical code, expires_at ('0' = never), max_issues, max_uses, held, sold,
--       uses, void ('1'|'0'), redeemer, redeemed_at
-- Reply: one entry per key: its id if loaded, or '=' .. the id already holding that digest,
--        or the key's own id when the engine has that key under another digest (nothing
--        changes for it) | {'no_sku'} | {'stale'} (the SKU is another generation:
--        it was lost and recreated since this rebuild began, and that rebuild loads it)
--      | {'loading'} (no generation was named and the SKU is being rebuilt or drained)
-- Used for new batches and to rebuild an engine that lost its data. Each call loads a chunk
-- (a thousand keys) so no call blocks the engine for long.
--
-- The outcome is that of loading the keys one after the other (as `save_key` would), but
-- the writes are gathered: one HMGET finds the digests already indexed, and each hash, the
-- counts and the `avail` list get one multi-value command per slice of keys instead of one
-- command per key, which made warming cost several times more engine time than needed.

if redis.call('EXISTS', K.meta) == 0 then return { 'no_sku' } end
local m = redis.call('HMGET', K.meta, 'gen', 'loading')
if ARGV[1] ~= '' then
  if (m[1] or '') ~= ARGV[1] then return { 'stale' } end
elseif m[2] then
  -- A load for whatever generation serves (a new batch, a warm-up) never goes into one
  -- being rebuilt or drained: keys are loaded once, so a key loaded now, in the state the
  -- ledger has before every gateway wrote what it answered, would keep that older state
  -- through the rebuild, and a sold code would be sold again.
  return { 'loading' }
end

-- Values per multi-value command: Lua's `unpack` cannot spread many more at once.
local SLICE = 4000

local function hset_all(key, values)
  for i = 1, #values, SLICE do
    redis.call('HSET', key, unpack(values, i, math.min(i + SLICE - 1, #values)))
  end
end

local function rpush_all(key, values)
  for i = 1, #values, SLICE do
    redis.call('RPUSH', key, unpack(values, i, math.min(i + SLICE - 1, #values)))
  end
end

local digests = {}
for i = 2, #ARGV, 12 do digests[#digests + 1] = ARGV[i + 1] end
local indexed = {}
for i = 1, #digests, SLICE do
  local found = redis.call('HMGET', K.idx, unpack(digests, i, math.min(i + SLICE - 1, #digests)))
  for j = 1, #found do indexed[i + j - 1] = found[j] end
end

local seq = tonumber(redis.call('HGET', K.meta, 'seq') or '0')
local top, top_id = seq, nil
-- What this call loaded so far, as the keys after them would have seen it in the engine.
local digest_ids, loaded = {}, {}
local idx, codes, records, avail, counts = {}, {}, {}, {}, {}
local reply = {}
for n = 1, #digests do
  local i = 2 + (n - 1) * 12
  local id, digest, code = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local existing = digest_ids[digest] or indexed[n]
  -- An index entry whose record is gone (partial loss) does not count: load the key again.
  if existing and (loaded[existing] or redis.call('HEXISTS', K.keys, existing) == 1) then
    reply[n] = '=' .. existing
  elseif loaded[id] or redis.call('HEXISTS', K.keys, id) == 1 then
    -- The key is here under another digest (its index key was replaced and the re-index,
    -- `kamigate rekey --index`, has not reached it): loading it again would roll its engine
    -- state back to the ledger's.
    reply[n] = '=' .. id
  else
    local k = {
      expires_at = tonumber(ARGV[i + 3]), max_issues = tonumber(ARGV[i + 4]),
      max_uses = tonumber(ARGV[i + 5]), held = tonumber(ARGV[i + 6]),
      sold = tonumber(ARGV[i + 7]), uses = tonumber(ARGV[i + 8]), void = ARGV[i + 9] == '1',
      redeemer = ARGV[i + 10], redeemed_at = tonumber(ARGV[i + 11]),
    }
    if tonumber(id) > top then top, top_id = tonumber(id), id end
    idx[#idx + 1] = digest
    idx[#idx + 1] = id
    codes[#codes + 1] = id
    codes[#codes + 1] = code
    -- A key new to the engine: what save_key(id, snapshot(nil), k) does, gathered.
    k.listed = issuable(k)
    if k.listed then avail[#avail + 1] = id end
    records[#records + 1] = id
    records[#records + 1] = encode_key(k)
    local state = key_state(k)
    counts[state] = (counts[state] or 0) + 1
    digest_ids[digest], loaded[id] = id, true
    reply[n] = id
  end
end

if top_id then redis.call('HSET', K.meta, 'seq', top_id) end
hset_all(K.idx, idx)
hset_all(K.codes, codes)
hset_all(K.keys, records)
for state, n in pairs(counts) do redis.call('HINCRBY', K.counts, state, n) end
rpush_all(K.avail, avail)
-- No event: warming restores what the ledger already records; it changes nothing there.
return reply
