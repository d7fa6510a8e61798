-- orders.lua — rebuild order records from the ledger's order events (after engine data loss).
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: per event 10 values, oldest first: kind (hold|claim|confirm|release|expire), order id,
--       user id, ','-joined key ids, event id, at (ms), expires_at, hold ms, quantity,
--       late ('1'|'0')
-- Reply: number of events applied
-- Keys come back from the ledger in their own state (warm.lua); this restores what makes a
-- retried order_id recognisable — its record, its hold in the expiry set, and per-user
-- counts — so a retry after the loss replays instead of claiming again. No events: the
-- ledger already has them.

local applied = 0
for i = 1, #ARGV, 10 do
  local kind, order_id, user, ids, eid = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local at, expires_at = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
  local hold_ms, qty, late = tonumber(ARGV[i + 7]), tonumber(ARGV[i + 8]), ARGV[i + 9] == '1'
  local id_list = split(ids, ',')
  local o = decode_order(redis.call('HGET', K.orders, order_id))
  if kind == 'hold' or kind == 'claim' then
    local held = kind == 'hold'
    o = {
      state = held and 'held' or 'claimed', qty = qty > 0 and qty or #id_list, user = user,
      hold_ms = hold_ms, expires_at = expires_at, late = false, created_at = at,
      updated_at = at, ids = id_list,
    }
    add_user_codes(user, o.qty)
    if held then redis.call('ZADD', K.holds, expires_at, order_id) end
  elseif o and kind == 'confirm' then
    if late then
      -- The hold had lapsed (its codes counted off the user); fresh codes count again.
      o.ids = id_list
      add_user_codes(o.user, o.qty)
    end
    o.state, o.late, o.updated_at = 'claimed', late, at
    redis.call('ZREM', K.holds, order_id)
  elseif o and (kind == 'release' or kind == 'expire') then
    if o.state == 'held' then add_user_codes(o.user, -o.qty) end
    o.state = kind == 'release' and 'released' or 'expired'
    o.updated_at = at
    redis.call('ZREM', K.holds, order_id)
  end
  if o then
    o.eid = eid
    save_order(order_id, o)
    applied = applied + 1
  end
end
return applied
