-- retire.lua — take settled orders and redemption marks out of the engine once they are old
-- enough and the ledger has their events, so `orders` and `redemptions` do not grow forever.
-- KEYS: the SKU key set (prelude.lua)
-- ARGV: 1 cutoff (ms): what settled at or before it retires, 2 the answer id through which
--       the ledger has every event of the SKU (`<gen>:<ms>-<seq>`; '' = none known),
--       3 most `settled` entries to take in this call (keeps each call short),
--       4 '1' to retire, '0' to only drop the entries (retention is off: records stay)
-- Reply: {orders retired, marks retired, more} — more = 1 when the call stopped at its
--        limit (further entries may be due)
--
-- Entries are taken from the head of `settled`, oldest first, and the call stops at the
-- first one too young or whose event the ledger may not have yet (put back, for the next
-- call): a record whose change exists only in the stream never leaves the engine. A retired
-- order leaves its fingerprint in `retired`, so a retry of it is answered {'moved'} and the
-- gateway restores it from the ledger (orders.lua) before answering: a retry gets its first
-- answer at any age. A retired redemption mark is one the key record answers for alike (the
-- code's last redeemer, see redeem.lua). Keys, counts and users' counts stay as they are.
-- No event: nothing changes that the ledger records.

local cutoff, through, limit = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local retiring = ARGV[4] == '1'
-- While a rebuild loads orders, the records are the ledger's anyway; retire later.
if unservable() then return { 0, 0, 0 } end

-- `<gen>:<ms>-<seq>` → gen, ms, seq.
local function parse_answer(answer)
  local gen, ms, seq = string.match(answer, '^(.*):(%d+)-(%d+)$')
  return gen, tonumber(ms), tonumber(seq)
end

local t_gen, t_ms, t_seq = parse_answer(through)
-- Whether the ledger has the event of answer id `eid`: true, false (not yet), or nil (an
-- event of an earlier generation of the SKU, which nothing here can tell: kept for good).
local function committed(eid)
  if eid == '' then return true end -- restored from the ledger
  local gen, ms, seq = parse_answer(eid)
  if gen ~= GEN then return nil end
  if t_gen ~= GEN then return false end
  return ms < t_ms or (ms == t_ms and seq <= t_seq)
end

local orders, marks, taken = 0, 0, 0
while taken < limit do
  local entry = redis.call('LPOP', K.settled)
  if not entry then break end
  local bar = string.find(entry, '|', 1, true)
  local at, what = tonumber(string.sub(entry, 1, bar - 1)), string.sub(entry, bar + 1)
  if at > cutoff then
    redis.call('LPUSH', K.settled, entry)
    return { orders, marks, 0 }
  end
  taken = taken + 1
  local cut = retiring and string.find(what, '|', 1, true)
  if cut then
    -- A redemption mark: "<key id>|<redeemer>".
    local rec = redis.call('HGET', K.redemptions, what)
    if rec then
      local redeemed_at, eid = string.match(rec, '^(%d+)|?(.*)$')
      local known = committed(eid)
      if known == false then
        redis.call('LPUSH', K.settled, entry)
        return { orders, marks, 0 }
      end
      local k = load_key(string.sub(what, 1, cut - 1))
      if known and k and k.uses >= k.max_uses and k.redeemer == string.sub(what, cut + 1)
          and k.redeemed_at == tonumber(redeemed_at) then
        redis.call('HDEL', K.redemptions, what)
        marks = marks + 1
      end
    end
  elseif retiring then
    local o = decode_order(redis.call('HGET', K.orders, what))
    -- Gone already, held again, or changed since this entry (a later one follows): skip.
    if o and o.state ~= 'held' and o.updated_at <= at then
      local known = committed(o.eid)
      if known == false then
        redis.call('LPUSH', K.settled, entry)
        return { orders, marks, 0 }
      end
      if known then
        redis.call('HDEL', K.orders, what)
        local bucket, mark = fingerprint(what)
        local prints = redis.call('HGET', K.retired, bucket) or ''
        if not string.find(prints, mark, 1, true) then
          redis.call('HSET', K.retired, bucket, prints .. mark)
        end
        orders = orders + 1
      end
    end
  end
end
return { orders, marks, taken == limit and 1 or 0 }
