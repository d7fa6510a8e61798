-- pool.lua — set or move a SKU's stock pools (see "Stock pools" in prelude.lua), atomically
-- and with an event for the ledger's audit.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 'set': 2 channel, 3 the count its pool is to hold, 4 now (ms), 5 by, 6 reason
--         (the difference comes from, or goes back to, the shared remainder)
--       1 'move': 2 from, 3 to (each a channel, or '' for the shared remainder), 4 count
--         (>= 1), 5 now (ms), 6 by, 7 reason, 8 the count `from` must hold now ('' = any:
--         a retried move with it cannot move twice)
--       1 'levels': nothing else
--       1 'load': 2 the SKU generation being rebuilt, then channel, count, … (the ledger's
--         pools after the engine lost the SKU: set as they are, no event; only while that
--         generation loads)
-- Reply: {'levels', available, shared remainder, channel, count, channel, count, …} ('levels')
--      | {'done', from level, to level, moved, event id, event} (for 'set', from is the
--        shared remainder and to the channel; moved may be negative, 0 when nothing changed,
--        and then the event is the SKU's last change of a pool while the stream has it)
--      | {'short', from level} (from holds fewer than asked)
--      | {'changed', from level} (from does not hold the count the move expected)
--      | {'loaded', total} | {'stale'} ('load': the SKU is another generation)
--      | {'done'} ('load': the generation no longer loads: another gateway's rebuild of it
--        ended, and its pools have moved on since)
--      | {'no_sku'} | {'loading'}

-- While the SKU is rebuilt (loading), before it serves anyone.
if ARGV[1] == 'load' then
  local m = redis.call('HMGET', K.meta, 'gen', 'loading')
  if (m[1] or '') ~= ARGV[2] then return { 'stale' } end
  -- A rebuild that reached this after another one of the same generation ended (it was
  -- paused, or slow) read the ledger's pools before the changes made since: loading them
  -- would undo those changes in the engine alone.
  if m[2] ~= '1' then return { 'done' } end
  redis.call('DEL', K.pools)
  local total = 0
  for i = 3, #ARGV, 2 do
    local n = tonumber(ARGV[i + 1])
    if n > 0 then
      redis.call('HSET', K.pools, ARGV[i], n)
      total = total + n
    end
  end
  if total > 0 then redis.call('HSET', K.pools, '*', total) end
  return { 'loaded', total }
end

local refused = unservable()
if refused then return refused end

-- The codes a pool holds: a channel's reservation, or ('') the shared remainder.
local function level(pool)
  local available, reserved = pool_totals()
  if pool == '' then return math.max(available - reserved, 0) end
  return tonumber(redis.call('HGET', K.pools, pool) or '0')
end

local function move(from, to, n, now, by, reason)
  if from ~= '' then add_to_pool(from, -n) end
  if to ~= '' then add_to_pool(to, n) end
  local eid = emit('pool', now, { 'from', from, 'to', to, 'delta', n, 'by', by, 'reason', reason })
  redis.call('HSET', K.meta, 'pool_event', eid)
  return { 'done', level(from), level(to), n, eid, EMITTED }
end

if ARGV[1] == 'levels' then
  local available, reserved = pool_totals()
  local reply = { 'levels', available, math.max(available - reserved, 0) }
  local flat = redis.call('HGETALL', K.pools)
  for i = 1, #flat, 2 do
    if flat[i] ~= '*' then
      reply[#reply + 1] = flat[i]
      reply[#reply + 1] = tonumber(flat[i + 1])
    end
  end
  return reply
end

if ARGV[1] == 'set' then
  local channel, want, now = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local have = level(channel)
  if want == have then
    -- Nothing to change, but the level may stand on an earlier call's change whose answer
    -- timed out waiting for the ledger, the call a client now retries: this answer waits
    -- for the last change of a pool the stream still has, as that answer would have.
    local eid = redis.call('HGET', K.meta, 'pool_event')
    local entry = stream_entry(eid)
    if entry then return { 'done', level(''), have, 0, eid, entry } end
    return { 'done', level(''), have, 0, '', {} }
  end
  if want > have then
    local shared = level('')
    if shared < want - have then return { 'short', shared } end
    return move('', channel, want - have, now, ARGV[5], ARGV[6])
  end
  local r = move(channel, '', have - want, now, ARGV[5], ARGV[6])
  -- Reported as for a set: the shared remainder, then the channel, moved into the channel.
  return { 'done', r[3], r[2], want - have, r[5], r[6] }
end

local from, to, n, now = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local have = level(from)
if ARGV[8] ~= '' and tonumber(ARGV[8]) ~= have then return { 'changed', have } end
if have < n then return { 'short', have } end
return move(from, to, n, now, ARGV[6], ARGV[7])
