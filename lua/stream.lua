-- stream.lua — the ledger writer's side of a SKU's event stream (src/ledger/writer.rs).
-- KEYS: 1 the SKU's events (STREAM kg:{sku}:events), 2 its dead letters (STREAM kg:{sku}:dead),
--       3 its settings (HASH kg:{sku}:meta, read only: its `gen`); all carry the SKU's hash
--       tag. The prelude's K names do not apply here.
-- ARGV: 'read', group, consumer, count, min idle ms[, sources[, gen, id…]]
--         Creates the group (from the first entry) if missing, acknowledges the ids given
--         as 'ack' does (entries committed since the last read, so a busy writer needs no
--         call of its own for them), then gives `consumer` up to `count` entries from the sources
--         named (default 'ocn'), in this order: o, its own unacknowledged ones (a batch whose
--         commit failed; a writer reading ahead while it commits them leaves them out); c,
--         entries other consumers have left unacknowledged for min idle ms (they died; the
--         scan walks the pending list, so a busy writer asks only now and then); n, entries
--         never delivered.
--         Reply: {pending, lag, floor, last_delivered, own, claimed, new, gen, owned, entry, …}
--           pending, lag     the group's backlog before this read: delivered and not yet
--                            acknowledged, and not yet delivered (lag)
--           floor            the oldest unsettled entry's id before this read (the smallest
--                            pending id or the first undelivered one), '' when none: every
--                            entry below it was acknowledged
--           last_delivered   the group's last delivered id before this read
--           own, claimed, new  how many of the entries came from each source, in this order
--           gen              the SKU's generation in the engine ('' without one): answers
--                            name it with their entry id, and ids compare only within one
--           owned            for a read without o: how many entries `consumer` had delivered
--                            and not acknowledged before this read (after the acknowledgements
--                            it carried); more than the writer holds means a read whose
--                            reply it never got (0 for a read with o, which takes them)
--           entry            {id, {field, value, …}}, as XREADGROUP gives them
--     | 'ack', group, gen, id…     Reply: how many were pending
--         Acknowledges committed entries, then trims what every group has settled. Only if
--         the SKU's generation is still gen: the ids name entries of that generation's
--         stream, and an entry of a later stream with the same id was never committed.
--     | 'dead', group, id, reason  Reply: 1 | 0 (the entry was no longer pending or gone)
--         Copies a pending entry to the dead-letter stream (with `source_id` and `reason`
--         fields before its own) and acknowledges it, in one step.
--     | 'backlog', group, now ms   Reply: {pending, lag, oldest unsettled entry's age ms, keys}
--         keys: how many keys the unsettled events change (an upper bound beyond the first
--         KEYS_COUNTED_MAX events, counting MAX_KEYS_PER_EVENT for each of the rest)
--     | 'entry', '', gen, id      Reply: {'lost'} | {'settled'}
--                                        | {'kept', {field, value, …}[, lapse id, {field, …}]}
--         Whether entry `id` of generation `gen` may still have to reach the ledger: 'lost'
--         when the SKU's generation is another (the entry went with the engine's data),
--         'settled' when the stream no longer has it (trimmed, so committed or
--         dead-lettered), else its fields (a replayed answer keeps them, see
--         src/http/mod.rs, durable), and for a late confirm the lapse it stands on
--         (confirm.lua), while the stream has it.
--     | 'reap', group, idle ms     Reply: how many consumers were deleted
--         Deletes consumers that own nothing and were not seen for idle ms: gateways that
--         stopped (each run has a fresh consumer name, so they would pile up otherwise).
--
-- Trimming never drops what a group still needs: the stream is cut below, for every group,
-- the smaller of its oldest pending id and its last delivered id. An entry below both was
-- delivered and acknowledged, i.e. committed to the ledger (or dead-lettered).

local events, dead, meta = KEYS[1], KEYS[2], KEYS[3]
local op, group = ARGV[1], ARGV[2]

-- Dead letters kept at most (approximately): poison should never happen, and a runaway
-- producer must not fill the engine's memory. Each one is also logged and counted.
local DEAD_LETTERS_MAX = 100000
-- Upper bound of the count made when Redis cannot tell a group's lag (after XDEL).
local LAG_COUNT_MAX = 10000
-- XAUTOCLAIM calls per read: each scans at most ten PEL entries per entry wanted, so a PEL
-- crowded with live consumers' entries is walked a few steps at a time, never all at once.
local AUTOCLAIM_ROUNDS = 4
-- Unsettled events whose keys 'backlog' counts one by one, and the most keys one event can
-- change (a claim's largest quantity) assumed for each event beyond.
local KEYS_COUNTED_MAX = 2000
local MAX_KEYS_PER_EVENT = 100
-- Events that change no key's state: the ledger already has what they say.
local NO_KEY_CHANGE = { add = true, sku = true }

-- Stream ids compare as (ms, seq). Both parts are exact Lua numbers: ms are epoch
-- milliseconds (< 2^53), seq counts entries within one millisecond.
local function id_parts(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

-- The smaller of two ids, either of which may be nil.
local function min_id(a, b)
  if not a then return b end
  if not b then return a end
  if id_less(b, a) then return b end
  return a
end

-- A flat RESP2 map {name, value, …} (XINFO) as a table.
local function as_map(flat)
  local m = {}
  for i = 1, #flat, 2 do m[flat[i]] = flat[i + 1] end
  return m
end

-- The stream's XINFO GROUPS records (none when the stream does not exist), and the one
-- of group `name` among them, or nil.
local function groups_info(name)
  if redis.call('EXISTS', events) == 0 then return {}, nil end
  local groups, found = {}, nil
  for i, g in ipairs(redis.call('XINFO', 'GROUPS', events)) do
    local m = as_map(g)
    groups[i] = m
    if m['name'] == name then found = m end
  end
  return groups, found
end

-- The group's XINFO GROUPS record, or nil (also when the stream does not exist).
local function group_info(name)
  local _, g = groups_info(name)
  return g
end

-- The oldest entry group `g` (an XINFO GROUPS record) holds pending, or nil.
local function oldest_pending(g)
  if tonumber(g['pending']) > 0 then return redis.call('XPENDING', events, g['name'])[2] end
  return nil
end

-- The id of the first entry after `id`, or nil.
local function entry_after(id)
  local e = redis.call('XRANGE', events, '(' .. id, '+', 'COUNT', 1)[1]
  if e then return e[1] end
  return nil
end

-- What group `g` (an XINFO GROUPS record) still owes the ledger:
-- pending, lag, the oldest unsettled id (nil when none), the last delivered id. `oldest`
-- (default `oldest_pending`) gives the group's oldest pending id.
local function owed(g, oldest)
  local pending = tonumber(g['pending'])
  local last = g['last-delivered-id']
  local looked, after = false, nil
  local function first_undelivered()
    if not looked then looked, after = true, entry_after(last) end
    return after
  end
  local floor = (oldest or oldest_pending)(g)
  -- A pending entry was delivered, so it is no later than the last delivered one and older
  -- than any entry after it: the first undelivered entry matters only without one (or past
  -- one, which only a group moved back by hand could have).
  if not floor or id_less(last, floor) then floor = min_id(floor, first_undelivered()) end
  local lag = g['lag']
  if not lag then
    -- Redis 7.0 cannot tell after an XDEL behind the group: count, up to a bound.
    lag = #redis.call('XRANGE', events, '(' .. last, '+', 'COUNT', LAG_COUNT_MAX)
  end
  lag = tonumber(lag)
  if lag > 0 then
    -- Redis 7.0 counts the lag from a read counter of the group's that can fall behind its
    -- deliveries (seen after Redis was killed, restarted from its AOF and paused under
    -- load): the lag then stays too high for good, a backlog that never drains. Nothing is
    -- undelivered when no entry follows the last delivered one, and never more than the
    -- stream holds beyond the pending entries.
    if not first_undelivered() then
      lag = 0
    else
      lag = math.min(lag, math.max(redis.call('XLEN', events) - pending, 1))
    end
  end
  return pending, lag, floor, last
end

-- Trims what every group of `groups` (XINFO GROUPS records, true now) has settled (see the
-- header); `oldest` (default `oldest_pending`) gives a group's oldest pending id. Returns
-- how many entries went.
local function trim_settled(groups, oldest)
  if not groups then groups = groups_info() end
  oldest = oldest or oldest_pending
  local floor = nil
  for _, m in ipairs(groups) do
    floor = min_id(floor, min_id(oldest(m), m['last-delivered-id']))
  end
  if not floor then return 0 end
  return redis.call('XTRIM', events, 'MINID', floor)
end

-- Acknowledges ARGV[first…] if the SKU's generation `current` is `gen`, and trims; returns
-- how many were pending.
local function ack(current, gen, first)
  if #ARGV < first or current ~= gen then return 0 end
  local acked = redis.call('XACK', events, group, unpack(ARGV, first))
  trim_settled()
  return acked
end

if op == 'read' then
  local consumer, count, min_idle = ARGV[3], tonumber(ARGV[4]), ARGV[5]
  local sources = ARGV[6] or 'ocn'
  local with_own = string.find(sources, 'o', 1, true) ~= nil
  local with_claimed = string.find(sources, 'c', 1, true) ~= nil
  local with_new = string.find(sources, 'n', 1, true) ~= nil
  local gen = redis.call('HGET', meta, 'gen') or ''
  local groups, g = groups_info(group)
  -- Each group's oldest pending id, asked once: after the acknowledgements below nothing
  -- this read does changes a pending list before the report (trimming cuts below every
  -- oldest pending entry).
  local oldest_of = {}
  local function oldest(m)
    local id = oldest_of[m['name']]
    if id == nil then
      id = oldest_pending(m) or false
      oldest_of[m['name']] = id
    end
    return id or nil
  end
  if not g then
    -- From the first entry: events written before any writer ran are owed too.
    redis.call('XGROUP', 'CREATE', events, group, '0', 'MKSTREAM')
    g = group_info(group)
  elseif #ARGV > 7 and ARGV[7] == gen then
    -- As 'ack' does, before the report below, so it counts them as settled. They leave the
    -- group's pending entries and nothing else of any group changes, so the records read
    -- above stay true with this group's count lowered.
    local acked = redis.call('XACK', events, group, unpack(ARGV, 8))
    g['pending'] = tonumber(g['pending']) - acked
    trim_settled(groups, oldest)
  end
  local pending, lag, floor, last = owed(g, oldest)
  local owned = 0
  if not with_own and pending > 0 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', events, group)) do
      local m = as_map(c)
      if m['name'] == consumer then
        owned = tonumber(m['pending'])
        break
      end
    end
  end
  local entries, seen = {}, {}
  local function take(entry)
    -- A deleted entry comes back as {id, nil}: it can never be committed (trimmed by hand).
    if entry[2] and not seen[entry[1]] then
      seen[entry[1]] = true
      entries[#entries + 1] = entry
      return 1
    end
    return 0
  end

  -- 1. This consumer's own unacknowledged entries: a batch whose commit failed.
  local own = 0
  local mine = with_own and redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
    'STREAMS', events, '0')
  if mine and mine[1] then
    local gone = {}
    for _, e in ipairs(mine[1][2]) do
      if e[2] then own = own + take(e) else gone[#gone + 1] = e[1] end
    end
    if #gone > 0 then redis.call('XACK', events, group, unpack(gone)) end
  end

  -- 2. Entries another consumer has left unacknowledged for min idle ms.
  local claimed, cursor = 0, '0-0'
  for _ = 1, AUTOCLAIM_ROUNDS do
    if #entries >= count or not with_claimed then break end
    local r = redis.call('XAUTOCLAIM', events, group, consumer, min_idle, cursor,
      'COUNT', count - #entries)
    for _, e in ipairs(r[2]) do claimed = claimed + take(e) end
    cursor = r[1]
    if cursor == '0-0' then break end
  end

  -- 3. Entries never delivered.
  local new = 0
  if #entries < count and with_new then
    local fresh = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count - #entries,
      'STREAMS', events, '>')
    if fresh and fresh[1] then
      for _, e in ipairs(fresh[1][2]) do new = new + take(e) end
    end
  end

  local reply = { pending, lag, floor or '', last, own, claimed, new, gen, owned }
  for _, e in ipairs(entries) do reply[#reply + 1] = e end
  return reply
end

if op == 'ack' then
  return ack(redis.call('HGET', meta, 'gen') or '', ARGV[3], 4)
end

if op == 'dead' then
  local id, reason = ARGV[3], ARGV[4]
  if not group_info(group) then return 0 end
  -- Only while still pending: two writers holding the same entry (a reclaim racing a slow
  -- consumer) must not copy it twice.
  if #redis.call('XPENDING', events, group, id, id, 1) == 0 then return 0 end
  local moved = 0
  local entry = redis.call('XRANGE', events, id, id)[1]
  if entry then
    redis.call('XADD', dead, 'MAXLEN', '~', DEAD_LETTERS_MAX, '*', 'source_id', id,
      'reason', reason, unpack(entry[2]))
    moved = 1
  end
  redis.call('XACK', events, group, id)
  trim_settled()
  return moved
end

if op == 'backlog' then
  local now = tonumber(ARGV[3])
  local function age(id)
    if not id then return 0 end
    local ms = id_parts(id)
    return math.max(now - ms, 0)
  end
  -- Keys changed by the unsettled entries from `from` on: pending ones at or below
  -- `last` (delivered), every one above it.
  local function keys_owed(from, last, pending_ids, total)
    if not from then return 0 end
    local keys, seen = 0, 0
    for _, e in ipairs(redis.call('XRANGE', events, from, '+', 'COUNT', KEYS_COUNTED_MAX)) do
      if (not last) or pending_ids[e[1]] or id_less(last, e[1]) then
        seen = seen + 1
        local f = as_map(e[2])
        if not NO_KEY_CHANGE[f['t']] and f['ids'] and f['ids'] ~= '' then
          local n = 1
          for _ in string.gmatch(f['ids'], ',') do n = n + 1 end
          keys = keys + n
        end
      end
    end
    return keys + math.max(total - seen, 0) * MAX_KEYS_PER_EVENT
  end
  local g = group_info(group)
  if not g then
    -- No writer has read this stream yet: all of it is owed.
    if redis.call('EXISTS', events) == 0 then return { 0, 0, 0, 0 } end
    local first = redis.call('XRANGE', events, '-', '+', 'COUNT', 1)[1]
    local lag = redis.call('XLEN', events)
    return { 0, lag, age(first and first[1]), keys_owed('-', nil, {}, lag) }
  end
  local pending, lag, floor, last = owed(g)
  local pending_ids = {}
  if pending > 0 then
    for _, p in ipairs(redis.call('XPENDING', events, group, '-', '+', KEYS_COUNTED_MAX)) do
      pending_ids[p[1]] = true
    end
  end
  return { pending, lag, age(floor), keys_owed(floor, last, pending_ids, pending + lag) }
end

if op == 'entry' then
  if (redis.call('HGET', meta, 'gen') or '') ~= ARGV[3] then return { 'lost' } end
  local found = redis.call('XRANGE', events, ARGV[4], ARGV[4])
  if #found == 0 then return { 'settled' } end
  local fields = found[1][2]
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'lapse' then
      local lapse = redis.call('XRANGE', events, fields[i + 1], fields[i + 1])[1]
      if lapse then return { 'kept', fields, lapse[1], lapse[2] } end
    end
  end
  return { 'kept', fields }
end

if op == 'reap' then
  local idle = tonumber(ARGV[3])
  if not group_info(group) then return 0 end
  local reaped = 0
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', events, group)) do
    local m = as_map(c)
    if tonumber(m['pending']) == 0 and tonumber(m['idle']) >= idle then
      redis.call('XGROUP', 'DELCONSUMER', events, group, m['name'])
      reaped = reaped + 1
    end
  end
  return reaped
end

return redis.error_reply('stream.lua: unknown op ' .. tostring(op))
