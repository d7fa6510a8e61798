-- sku.lua — create or update a SKU's settings, or read them.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 'put', config JSON, per_user_limit (0 = none), allow_late ('1'|'0'), max_issues,
--       max_uses, now (ms), gen, loading ('1'|'0'), floor (a stream id, or '' or none)
--                                                Reply: {'created'} | {'updated'}
--         gen, loading and floor apply only when the call creates the SKU: gen names this
--         incarnation (see emit in the prelude); loading = '1' creates it for a rebuild
--         from the ledger, unservable until 'ready'; floor is the least stream id its
--         events may take (see 'floor'), given when the ledger holds events of the SKU.
--     | 'get'                                    Reply: {config JSON, gen, loading,
--                                                      created_at, acks} | {'no_sku'}
--         acks: ',<gateway>,<gateway>,' the gateways that wrote what they answered into
--         the ledger since this rebuild began (see 'ack'), '' if none
--     | 'ack', gen, gateway                      Reply: {'acked'} | {'late'} | {'stale'}
--                                                     | {'no_sku'}
--         Records, while generation gen is loading, that `gateway` wrote into the ledger
--         what it answered before the loss: the rebuild waits for every gateway alive.
--         'late' when the rebuild reads the ledger already (it stopped waiting for the
--         gateway, presumed gone): recorded all the same (any gateway may finish that
--         rebuild), but what the gateway wrote since may be missing from it.
--     | 'read', gen                              Reply: {'reading'} | {'done'} | {'stale'}
--                                                     | {'no_sku'}
--         A rebuild of generation gen starts reading the ledger: acknowledgements are late
--         from now on. 'done' when gen is no longer loading.
--     | 'floor', gen, id, now (ms)               Reply: {'raised'} | {'above'} | {'stale'}
--                                                     | {'no_sku'}
--         Makes the stream ids of generation gen at least `id` (the id just above the
--         largest the ledger holds of the SKU: a rebuild reads it after 'read', an epoch
--         check when it finds the engine replaced): 'raised' by appending a `sku` event
--         {op = 'floor'} with id `id`, 'above' when its ids had passed it. A recreated
--         stream's ids come from the engine's clock, which may be behind the one that made
--         the ledger's events: their ids would come again (the ledger takes a repeated id
--         for an event it has and drops it) or sort a later take of a key before an
--         earlier one (src/ledger/rules.rs, `later_entry`).
--     | 'ready', gen, epoch                      Reply: {'ready'} | {'done'} | {'stale'}
--                                                     | {'no_sku'}
--         Ends a rebuild of generation gen and marks the engine with epoch (see below): the
--         one call that ends it gets 'ready'; 'done' when another rebuild ended it already;
--         'stale' when the SKU was lost and recreated since (that rebuild ends it).
--     | 'epoch'                                  Reply: {epoch or ''} | {'no_sku'}
--     | 'mark', epoch                            Reply: {'marked'} | {'no_sku'}
--     | 'drain'                                  Reply: {'draining', gen} | {'unread', gen}
--                                                     | {'no_sku'}
--         Answers of a lost generation just reached the ledger (src/gateway.rs): stops the
--         generation the engine has now serving clients (they are told to retry) and
--         changing, so its stream can be committed to the ledger before the SKU is rebuilt
--         from it, unless it is a rebuild that has not read the ledger yet ('unread': that
--         rebuild reads the answers). Also stops a rebuild reading already: what it read
--         may lack them.
--     | 'drop', gen                              Reply: {'dropped'} | {'stale'} | {'no_sku'}
--         Deletes the SKU's keys, as a loss of the engine's data would, if generation gen is
--         draining: every gateway then rebuilds it from the ledger as after any loss.
--     | 'reserve', n                             Reply: {'reserved', last id} | {'no_sku'}
--         Takes the next n key ids from the SKU's sequence (ids last - n + 1 .. last), for
--         codes sealed with their key id before add.lua stores them.
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
if op == 'drain' then
  local m = redis.call('HMGET', K.meta, 'created_at', 'gen', 'loading', 'reading')
  if not m[1] then return { 'no_sku' } end
  local gen = m[2] or ''
  if m[3] == '1' and not m[4] then return { 'unread', gen } end
  redis.call('HSET', K.meta, 'loading', '2')
  redis.call('HDEL', K.meta, 'reading', 'acks')
  return { 'draining', gen }
end
if op == 'drop' then
  local m = redis.call('HMGET', K.meta, 'created_at', 'gen', 'loading')
  if not m[1] then return { 'no_sku' } end
  if (m[2] or '') ~= ARGV[2] or m[3] ~= '2' then return { 'stale' } end
  redis.call('DEL', unpack(KEYS))
  return { 'dropped' }
end
if op == 'reserve' then
  if redis.call('EXISTS', K.meta) == 0 then return { 'no_sku' } end
  return { 'reserved', redis.call('HINCRBY', K.meta, 'seq', tonumber(ARGV[2])) }
end
if op == 'get' then
  local m = redis.call('HMGET', K.meta, 'config', 'gen', 'loading', 'created_at', 'acks')
  if not m[1] then return { 'no_sku' } end
  return { m[1], m[2] or '', m[3] or '0', m[4] or '0', m[5] or '' }
end
if op == 'ack' then
  local m = redis.call('HMGET', K.meta, 'created_at', 'gen', 'loading', 'acks', 'reading')
  if not m[1] then return { 'no_sku' } end
  if (m[2] or '') ~= ARGV[2] or m[3] ~= '1' then return { 'stale' } end
  local acks, mark = m[4] or ',', ARGV[3] .. ','
  if not string.find(acks, ',' .. mark, 1, true) then
    redis.call('HSET', K.meta, 'acks', acks .. mark)
  end
  return { m[5] and 'late' or 'acked' }
end
if op == 'floor' then
  if redis.call('EXISTS', K.meta) == 0 then return { 'no_sku' } end
  if (redis.call('HGET', K.meta, 'gen') or '') ~= ARGV[2] then return { 'stale' } end
  if append_at(ARGV[3], 'sku', tonumber(ARGV[4]), { 'op', 'floor' }) then
    return { 'raised' }
  end
  return { 'above' }
end
if op == 'read' or op == 'ready' then
  if redis.call('EXISTS', K.meta) == 0 then return { 'no_sku' } end
  if (redis.call('HGET', K.meta, 'gen') or '') ~= ARGV[2] then return { 'stale' } end
  if redis.call('HGET', K.meta, 'loading') ~= '1' then return { 'done' } end
  if op == 'read' then
    redis.call('HSET', K.meta, 'reading', '1')
    return { 'reading' }
  end
  redis.call('HDEL', K.meta, 'loading', 'acks', 'reading')
  redis.call('HSET', K.meta, 'epoch', ARGV[3])
  return { 'ready' }
end

local now = tonumber(ARGV[7])
local created = redis.call('HSETNX', K.meta, 'created_at', now) == 1
if created then
  redis.call('HSET', K.meta, 'gen', ARGV[8] or '')
  if ARGV[9] == '1' then redis.call('HSET', K.meta, 'loading', '1') end
end
redis.call('HSET', K.meta, 'config', ARGV[2], 'per_user_limit', ARGV[3], 'allow_late', ARGV[4],
  'max_issues', ARGV[5], 'max_uses', ARGV[6], 'updated_at', now)
local floor = created and ARGV[10] or ''
if floor == '' or not append_at(floor, 'sku', now, { 'op', 'create' }) then
  emit('sku', now, { 'op', created and 'create' or 'update' })
end
return { created and 'created' or 'updated' }
