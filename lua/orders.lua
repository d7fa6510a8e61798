-- orders.lua — rebuild order records from the ledger's order events (after engine data loss),
-- or restore one retired order (retire.lua).
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 the SKU generation this rebuild is for ('' with a restore: whichever serves),
--       2 '' for a rebuild, or now (ms) to restore retired orders,
--       then per event 13 values: kind (hold|claim|confirm|release|expire), order id, user id,
--       ','-joined key ids, event id, at (ms), expires_at, hold ms, quantity, late ('1'|'0'),
--       the event's sequence number in the ledger, the pool it drew from, codes drawn from
--       it (a lapse or release of a rebuilt hold gives them back to that pool)
-- Reply: number of events applied | {'stale'} (the SKU is another generation: lost and
--        recreated since this rebuild began; that rebuild restores its orders)
--      | {'loading'} (a restore while the SKU is rebuilt: the rebuild brings the order back)
--      | {'no_sku'}
-- Keys come back from the ledger in their own state (warm.lua); this restores what makes a
-- retried order_id recognisable — its record, its hold in the expiry set, and per-user
-- counts — so a retry after the loss replays instead of claiming again. No events: the
-- ledger already has them.
--
-- The ledger holds events in the order they were committed, which is not always the order
-- they happened: several writers commit a SKU's stream, each its own batch. So an order's
-- events are merged by rank, not applied in arrival order: a confirm (final) outranks a
-- release or expiry, which outranks the hold or claim that created the order; an event of
-- lower rank only fills in what the record lacks (quantity, hold length, creation time).
-- Events at or below the SKU's `orders_seq` (meta) were applied already: a rebuild that is
-- run again (interrupted, or by two gateways at once) changes nothing twice. Once the SKU
-- serves clients, an order changed live (a record without a rank) is newer than anything the
-- ledger can tell and is left alone; only orders the engine lacks, or still holds as rebuilt,
-- are written.
--
-- A restore is given every event of the orders it restores (retired orders are final and
-- the ledger had all their events when they retired), and takes them whatever `orders_seq`
-- says. It leaves the users' counts alone: a retired order's codes never stopped counting
-- toward its user. Each order restored is listed as settled as of now, so it stays for a
-- retention period again before it retires once more.

local RANK = { hold = 1, claim = 1, release = 2, expire = 2, confirm = 3 }
-- Whether an order in this state holds or owns its codes (counts toward its user).
local function counted(state) return state == 'held' or state == 'claimed' end

local restore_at = tonumber(ARGV[2])
if restore_at then
  local refused = unservable()
  if refused then return refused end
elseif (redis.call('HGET', K.meta, 'gen') or '') ~= ARGV[1] then
  return { 'stale' }
end
local loading = not restore_at and redis.call('HGET', K.meta, 'loading') == '1'
-- Orders a restore wrote, to list as settled once all their events are merged.
local restored = {}
-- Merges one ledger event into order `order_id`'s record.
local function merge(order_id, o, kind, user, id_list, at, expires_at, hold_ms, qty, late,
                     pool, pooled)
  local rank = RANK[kind]
  local was = o and o.state
  local was_rank = o and tonumber(o.rank) or 0
  if not o then
    o = {
      state = 'held', qty = qty > 0 and qty or #id_list, user = user, hold_ms = 0,
      expires_at = 0, late = false, created_at = at, updated_at = at, ids = id_list,
    }
  end
  -- Where its codes came from: the creation's draw, unless a late confirm drew afresh.
  if (rank == 1 and (o.pool or '') == '') or (kind == 'confirm' and late) then
    o.pool, o.pooled = pool, pooled
  end
  if rank == 1 then
    -- The creation: what only it knows.
    o.qty = qty > 0 and qty or #id_list
    o.hold_ms, o.created_at = hold_ms, at
    if kind == 'hold' then o.expires_at = expires_at end
    if not was then o.user = user end
  end
  if rank >= was_rank then
    if kind == 'claim' or kind == 'confirm' then
      o.state = 'claimed'
    elseif kind == 'hold' then
      o.state = 'held'
    else
      o.state = kind == 'release' and 'released' or 'expired'
    end
    if kind == 'confirm' then o.late = late end
    o.ids = id_list
    o.updated_at = math.max(o.updated_at, at)
    o.rank = rank
  end
  if o.state == 'held' then
    redis.call('ZADD', K.holds, o.expires_at, order_id)
  else
    redis.call('ZREM', K.holds, order_id)
  end
  if not restore_at then
    local delta = (counted(o.state) and o.qty or 0) - ((was and counted(was)) and o.qty or 0)
    if delta ~= 0 then add_user_codes(o.user, delta) end
  end
  o.eid = ''
  if restore_at then
    save_order(order_id, o, o.rank, false)
    restored[order_id] = o
  else
    save_order(order_id, o, o.rank)
  end
end

local applied = 0
local done = tonumber(redis.call('HGET', K.meta, 'orders_seq') or '0')
for i = 3, #ARGV, 13 do
  local seq, kind, order_id = tonumber(ARGV[i + 10]), ARGV[i], ARGV[i + 1]
  if (restore_at or seq > done) and RANK[kind] then
    if not restore_at then done = seq end
    local o = decode_order(redis.call('HGET', K.orders, order_id))
    -- An order changed live since (no rank) is newer than the ledger: keep it.
    if loading or not o or o.rank ~= '' then
      merge(order_id, o, kind, ARGV[i + 2], split(ARGV[i + 3], ','), tonumber(ARGV[i + 5]),
        tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7]), tonumber(ARGV[i + 8]), ARGV[i + 9] == '1',
        ARGV[i + 11], tonumber(ARGV[i + 12]))
      applied = applied + 1
    end
  end
end
if restore_at then
  for order_id, o in pairs(restored) do
    if o.state ~= 'held' then
      redis.call('RPUSH', K.settled, int(restore_at) .. '|' .. order_id)
    end
  end
else
  redis.call('HSET', K.meta, 'orders_seq', done)
end
return applied
