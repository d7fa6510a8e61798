-- prelude.lua — the helpers every script of this directory shares. Two forms run it
-- (src/engine/script.rs): prepended to each script for EVAL (the embedded engine), where it
-- runs on every call; and once per Redis Functions library load, each script a function of
-- that library. Either way `begin` below starts each call; nothing here may touch KEYS,
-- ARGV or redis.call outside a function, since a library load has no call to read.
--
-- KEYS of every per-SKU script, in this order; all share the SKU's hash tag `{sku}` so a
-- script touches one Redis Cluster slot:
--   1 meta         HASH  SKU settings: config (JSON), per_user_limit, allow_late, max_issues,
--                        max_uses, seq (last key id), created_at; gen (this incarnation of
--                        the SKU in the engine, see emit); loading ('1' while a rebuild from
--                        the ledger is under way: scripts that serve clients answer
--                        {'loading'} instead of judging stock from a partial load; '2' while
--                        the SKU is drained for a rebuild, see sku.lua 'drain'); acks and
--                        reading (while loading: the gateways that wrote their answers,
--                        and whether the rebuild reads the ledger, see sku.lua 'ack');
--                        pool_event (the answer id of the last change of a pool, pool.lua)
--   2 avail        LIST  key ids that can be issued now, oldest first; may also hold stale
--                        entries (keys no longer issuable, or gone), dropped when popped
--   3 keys         HASH  key id -> key record (see decode_key)
--   4 codes        HASH  key id -> sealed code (opened by the gateway for the claimer; the
--                        scripts never see a code in clear, see src/secrets)
--   5 idx          HASH  keyed code digest -> key id
--   6 orders       HASH  order id -> order record (see decode_order)
--   7 holds        ZSET  order id scored by its hold's expiry (ms)
--   8 users        HASH  user id -> codes currently issued to that user (held or claimed)
--   9 redemptions  HASH  "<key id>|<redeemer>" -> "<redeemed_at ms>|<event id>"
--  10 counts       HASH  state -> number of keys in it
--  11 events       STREAM every state change, for the ledger
--  12 pools        HASH  channel -> codes of `avail` reserved for that channel's claims,
--                        '*' -> their sum (see "Stock pools" below)
--  13 settled      LIST  what may retire once old enough (retire.lua), in the order it
--                        settled: "<settled at ms>|<order id>" for an order that became final
--                        (claimed, released or expired; see save_order) and
--                        "<redeemed at ms>|<key id>|<redeemer>" for a redemption mark the key
--                        record answers for as well (see redeem.lua). An order entry older
--                        than its record's updated_at is stale (a later entry follows)
--  14 retired      HASH  where retired orders leave a fingerprint (see fingerprint): bucket
--                        (4 hex digits) -> ','-led 6-hex-digit fingerprints, so a retried
--                        order id the engine no longer holds is told from a new one
--
-- Records are '|'-separated: identifiers (order, user, redeemer) are checked at the edge to
-- never contain '|' or ','. Times are integer milliseconds passed in ARGV, so every engine and
-- every test agrees on "now".

-- The standard libraries the helpers and scripts use, bound by `begin` at the start of each
-- call. In a Redis function every global read first misses the library's own globals table
-- and then goes through its metatable to the run-time globals, two table lookups; as
-- upvalues they are one read each, and a claim reads them dozens of times. They cannot be
-- bound as the library loads, which sees only a restricted `redis`. (`redis` stays global:
-- the load registers the functions through it, and tests/lua_commands.rs checks every
-- `redis.call` site.)
local function run_time_globals()
  return string, table, math, tonumber, type, ipairs, pairs, unpack
end
local string, table, math, tonumber, type, ipairs, pairs, unpack

-- The call's keys by name (see begin).
local K = {}

-- An integer as text. Lua turns numbers into text with '%.14g', an exact decimal conversion
-- that costs millisecond timestamps thousands of instructions each; '%d' is an integer
-- conversion, but even one `string.format` costs a thousand instructions, and a claim writes
-- a dozen numbers. Nearly all are small (counts, quantities, flags, 0 for an unset time) or
-- the call's `now` again and again (created_at, updated_at, at, a settled entry): small ones
-- are kept once converted, and the last two others are remembered (`now` and a hold's
-- expiry, or a SKU's max_issues). Numbers a script writes go through here, numbers only, and
-- so do numbers it passes to `redis.call`, which turns them into text the '%.14g' way too.
-- The memo is only ever what `string.format` gave for the same number, so it may outlive a
-- call (a library keeps it between calls).
local SMALL_INT = {}
local BIG_X1, BIG_S1, BIG_X2, BIG_S2
local function int(x)
  local s = SMALL_INT[x]
  if s then return s end
  if x == BIG_X1 then return BIG_S1 end
  if x == BIG_X2 then return BIG_S2 end
  s = string.format('%d', x)
  if x >= 0 and x < 1024 then
    SMALL_INT[x] = s
  else
    BIG_X2, BIG_S2, BIG_X1, BIG_S1 = BIG_X1, BIG_S1, x, s
  end
  return s
end

-- Writes a claim call defers to its end (claim.lua, claims_batch.lua; nil in other calls):
-- `counts` deltas by state and `settled` entries in order, one command each per call
-- instead of two and one per order; a command from a script costs a few thousand
-- instructions however little it does. Nothing the call reads misses a deferred write:
-- `counts` is read through `available_codes`, `settled` only by retire.lua. (The codes a
-- batch reveals, looked up in one HMGET at the end instead of one per order, cost as much:
-- a long reply costs Lua more per element.)
local DEFERRED = nil

-- Text as a number, exactly as `tonumber` reads it. Records are read field by field (a key's
-- seven numbers on every claim), and `tonumber` of a decimal text costs hundreds of
-- instructions; the same few short texts ('0', '1', a SKU's limits) come back all the time,
-- so the first few thousand short ones read are kept.
local NUM, NUMS = {}, 0
local function num(s)
  local n = NUM[s]
  if n then return n end
  n = tonumber(s)
  if n and NUMS < 4096 and #s <= 7 then
    NUM[s], NUMS = n, NUMS + 1
  end
  return n
end

-- Splits on a single plain separator character, keeping empty fields.
local function split(s, sep)
  local out, n, start = {}, 0, 1
  if s == '' then return out end
  while true do
    local i = string.find(s, sep, start, true)
    n = n + 1
    if not i then
      out[n] = string.sub(s, start)
      return out
    end
    out[n] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- Whether the key may be handed to another order. Every such key is in `avail`.
local function issuable(k)
  return not k.void and k.uses < k.max_uses and k.sold + k.held < k.max_issues
end

-- A key (one card code) record:
--   void|held|sold|uses|max_issues|max_uses|expires_at|redeemer|redeemed_at|listed
-- held/sold count the orders holding/owning the key (more than one only for reusable codes).
-- listed is '1' while the key id has an entry in `avail`: a key that stops being issuable
-- keeps its entry until `take` pops and drops it (removing it at once would scan the whole
-- list, blocking every script of the SKU's shard), and the flag keeps a key that becomes
-- issuable again meanwhile from being listed twice. Records written before the flag existed
-- have nine fields; back then exactly the issuable keys were listed.
-- Read with one pattern match: splitting the record field by field (twenty string calls) was
-- a tenth of a claim's instructions in Redis.
local KEY_FIELDS =
  '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|?([^|]*)'
local function decode_key(rec)
  if not rec then return nil end
  local void, held, sold, uses, max_issues, max_uses, expires_at, redeemer, redeemed_at, listed =
    string.match(rec, KEY_FIELDS)
  local k = {
    void = void == '1', held = num(held), sold = num(sold), uses = num(uses),
    max_issues = num(max_issues), max_uses = num(max_uses), expires_at = num(expires_at),
    redeemer = redeemer, redeemed_at = num(redeemed_at),
  }
  if listed ~= '' then k.listed = listed == '1' else k.listed = issuable(k) end
  return k
end

-- Runs for every key a script writes (a thousand a call when warming): one concatenation,
-- whose numbers `int` mostly finds converted already.
local function encode_key(k)
  return (k.void and '1|' or '0|') .. int(k.held) .. '|' .. int(k.sold) .. '|' .. int(k.uses)
    .. '|' .. int(k.max_issues) .. '|' .. int(k.max_uses) .. '|' .. int(k.expires_at) .. '|'
    .. k.redeemer .. '|' .. int(k.redeemed_at) .. '|' .. (k.listed and '1' or '0')
end

local function load_key(id)
  return decode_key(redis.call('HGET', K.keys, id))
end

-- A key's state is derived, never stored, so counts cannot disagree with records.
local function key_state(k)
  if k.void then return 'void' end
  if k.sold > 0 and k.uses >= k.max_uses then return 'redeemed' end
  if k.sold + k.held >= k.max_issues then
    if k.sold > 0 then return 'claimed' end
    return 'held'
  end
  return 'available'
end

-- The state a key was in before it changed, for `save_key` (nil: a new key).
local function snapshot(k)
  return k and key_state(k)
end

-- Stores a changed key and keeps `counts` consistent with it, and lists it in `avail` if it
-- became issuable and has no entry there. O(1): an entry that went stale stays (see
-- decode_key).
local function save_key(id, before, k)
  local list = issuable(k) and not k.listed
  if list then k.listed = true end
  redis.call('HSET', K.keys, id, encode_key(k))
  local state = key_state(k)
  if before ~= state then
    local deferred = DEFERRED and DEFERRED.counts
    if deferred then
      if before then deferred[before] = (deferred[before] or 0) - 1 end
      deferred[state] = (deferred[state] or 0) + 1
    else
      if before then redis.call('HINCRBY', K.counts, before, '-1') end
      redis.call('HINCRBY', K.counts, state, '1')
    end
  end
  if list then redis.call('RPUSH', K.avail, id) end
end

-- An order record:
--   state|quantity|user|hold_ms|expires_at|late|created_at|updated_at|ids|eid|rank
-- state: held, claimed, released or expired. ids are ','-joined key ids. eid is the answer id
-- (see emit) of the last event that changed the order: with durability "ledger", answers
-- (replays too) wait until the ledger has committed it; '' when the ledger has it already.
-- rank is set only on orders rebuilt from the ledger and not changed since (orders.lua): any
-- live change saves the record without it, so a rebuild never overwrites a live order.
-- pool is the channel whose pool the order drew from first and pooled how many of its codes
-- came from that pool (the rest came from the shared remainder); records written before
-- pools existed have neither: every code came from the shared remainder.
local function decode_order(rec)
  if not rec then return nil end
  local f = split(rec, '|')
  return {
    state = f[1], qty = num(f[2]), user = f[3], hold_ms = num(f[4]),
    expires_at = num(f[5]), late = f[6] == '1', created_at = num(f[7]),
    updated_at = num(f[8]), ids = split(f[9], ','), eid = f[10] or '', rank = f[11] or '',
    pool = f[12] or '', pooled = num(f[13] or '0'),
  }
end

-- Stores an order. One that is final from now on (any state but held) is listed in
-- `settled` as of `settled_at` (default: its updated_at), so it retires once old enough;
-- `settled_at` false lists it not (the caller does).
local function save_order(order_id, o, rank, settled_at)
  redis.call('HSET', K.orders, order_id, o.state .. '|' .. int(o.qty) .. '|' .. o.user
    .. '|' .. int(o.hold_ms) .. '|' .. int(o.expires_at) .. (o.late and '|1|' or '|0|')
    .. int(o.created_at) .. '|' .. int(o.updated_at) .. '|' .. table.concat(o.ids, ',')
    .. '|' .. (o.eid or '') .. '|' .. (rank or '') .. '|' .. (o.pool or '') .. '|'
    .. int(o.pooled or 0))
  if o.state ~= 'held' and settled_at ~= false then
    local entry = int(settled_at or o.updated_at) .. '|' .. order_id
    if DEFERRED then
      DEFERRED.settled[#DEFERRED.settled + 1] = entry
    else
      redis.call('RPUSH', K.settled, entry)
    end
  end
end

-- Where order `order_id` leaves its mark when it retires: a bucket of `retired` and a
-- fingerprint within it, both from the SHA-1 of the id (40 bits in all: with N orders
-- retired, a new order id matches one with a chance of about N / 2^40). Every fingerprint
-- starts with ',', which no hex digit is, so a match is always a whole fingerprint.
local function fingerprint(order_id)
  local h = redis.sha1hex(order_id)
  return string.sub(h, 1, 4), ',' .. string.sub(h, 5, 10)
end

-- Whether this SKU has retired any order, once per call (see may_be_retired; nil: not yet
-- asked). Scripts that look orders up never retire one, so the answer holds for the call.
local ANY_RETIRED = nil

-- Whether order `order_id`, which `orders` lacks, may have been retired: its fingerprint
-- is present. A fingerprint may belong to another order; the ledger tells. Until its first
-- retirement (a week after its first settled order, by default) a SKU has no fingerprint
-- to look for, and every new order of a flash sale would pay the SHA-1 of its id for
-- nothing: one EXISTS per call answers for all of them.
local function may_be_retired(order_id)
  if ANY_RETIRED == nil then ANY_RETIRED = redis.call('EXISTS', K.retired) == 1 end
  if not ANY_RETIRED then return false end
  local bucket, mark = fingerprint(order_id)
  local prints = redis.call('HGET', K.retired, bucket)
  return prints and string.find(prints, mark, 1, true) ~= nil or false
end

-- The reply about an order `orders` lacks: {'moved'} when it may have been retired (the
-- gateway restores it from the ledger, orders.lua, and asks again), else {'not_found'}.
local function unknown_order(order_id)
  if may_be_retired(order_id) then return { 'moved' } end
  return { 'not_found' }
end

-- The last event this script call appended: {stream id, t, kind, at, now, field, value, …}.
-- Replies that answer a change carry it, so the answering gateway can keep the change until
-- the ledger has it, even if the engine loses its data first (see src/ledger/journal.rs).
-- An answer that stands on an earlier event the ledger may not have yet (a late confirm on
-- its hold's lapse, see confirm.lua) carries a list instead: those events, oldest first,
-- then its own, each in the form above; the gateway keeps (or awaits) them all.
-- A new claim or hold (claim_order) carries only {stream id, pooled}, a new redemption
-- (redeem.lua) {stream id, uses}: every other field of their events is the call's own
-- arguments or in the reply beside it (the codes' ids, the expiry), and the gateway
-- rebuilds the entry from them (src/inventory/mod.rs, `ClaimEvent`, `RedeemEvent`). Claims
-- and redemptions are most of what a sale asks, and a claim's event's twenty strings,
-- copied into the reply and turned into RESP, were a tenth of its cost in Redis.
local EMITTED = {}

-- Appends an event to the SKU's stream and returns its answer id, `<gen>:<stream id>`.
-- `fields` alternate names and values. The SKU's generation (meta `gen`, new each time the
-- SKU is created in an engine) tells an entry of a stream that was lost and recreated from
-- a later one with a larger id, so nobody takes one for the other.
-- The SKU's generation, read once per script call (by unservable, or by the first emit).
local GEN = nil

-- Appends the event without reporting it (EMITTED unchanged): its answer id, then its
-- stream id.
-- Numbers among `fields` are written as integers, unless `text` says every value is text
-- already (a claim's own event: it converts its few numbers itself).
local function append(kind, now, fields, text)
  if not text then
    for i = 2, #fields, 2 do
      if type(fields[i]) == 'number' then fields[i] = int(fields[i]) end
    end
  end
  local id = redis.call('XADD', K.events, '*', 't', kind, 'at', int(now), unpack(fields))
  if not GEN then GEN = redis.call('HGET', K.meta, 'gen') or '' end
  return GEN .. ':' .. id, id
end

-- Appends the event (its values text) with stream id `id` if the stream's ids have not
-- passed it yet, as append does; nil when they have. A SKU rebuilt from the ledger raises
-- its stream's ids above every id the ledger holds of it this way (sku.lua 'put', 'floor').
local function append_at(id, kind, now, fields)
  local added = redis.pcall('XADD', K.events, id, 't', kind, 'at', int(now), unpack(fields))
  if type(added) ~= 'string' then return nil end
  if not GEN then GEN = redis.call('HGET', K.meta, 'gen') or '' end
  return GEN .. ':' .. added, added
end

local function emit(kind, now, fields)
  local eid, id = append(kind, now, fields)
  EMITTED = { id, 't', kind, 'at', int(now) }
  for i = 1, #fields do EMITTED[#EMITTED + 1] = fields[i] end
  return eid
end

-- The entry of this SKU's stream that answer id `answer_id` (see emit) names, in EMITTED's
-- form; nil for an entry of another generation or one trimmed away, which the ledger has.
-- Only after unservable or emit (GEN is known).
local function stream_entry(answer_id)
  local gen, id = string.match(answer_id or '', '^(.*):([^:]+)$')
  if not id or gen ~= GEN then return nil end
  local entry = redis.call('XRANGE', K.events, id, id)[1]
  if not entry then return nil end
  local out = { entry[1] }
  for i, v in ipairs(entry[2]) do out[i + 1] = v end
  return out
end

-- Nil when the SKU can serve clients, else the reply to give: {'no_sku'} when the engine
-- lacks it, {'loading'} while it is being rebuilt from the ledger or drained for a rebuild.
-- One command on the hot path: every SKU has `created_at` (sku.lua), and the generation
-- comes along for emit.
local function unservable()
  local m = redis.call('HMGET', K.meta, 'created_at', 'loading', 'gen')
  if not m[1] then return { 'no_sku' } end
  if m[2] then return { 'loading' } end
  GEN = m[3] or ''
  return nil
end

-- Adjusts how many codes a user currently has from this SKU.
local function add_user_codes(user, delta)
  if user == '' then return end
  local n = redis.call('HINCRBY', K.users, user, int(delta))
  if n <= 0 then redis.call('HDEL', K.users, user) end
end

-- Whether issuing `qty` more codes to `user` stays within the SKU's per-user limit.
-- Returns nil when allowed, else a user_limit reply.
local function check_user_limit(user, qty)
  if user == '' then return nil end
  local limit = tonumber(redis.call('HGET', K.meta, 'per_user_limit') or '0')
  if limit <= 0 then return nil end
  local current = tonumber(redis.call('HGET', K.users, user) or '0')
  if current + qty > limit then return { 'user_limit', current, limit } end
  return nil
end

-- Stock pools. A channel's pool reserves codes of `avail` for its claims: `pools[channel]`
-- of the available codes may be taken by that channel only, and `pools['*']` is their sum.
-- What no pool reserves, available minus that sum, is the shared remainder, which any
-- channel whose settings allow it draws from once its own pool is empty. The codes are not
-- moved into lists of their own: every code of `avail` is as good as any other, so a pool
-- is a count, and moving codes between pools is one O(1) step however many move.
-- Invariant: 0 <= pools[c] and pools['*'] = sum of pools[c] <= counts['available'].

-- Codes available now, deferred changes included.
local function available_codes()
  local n = tonumber(redis.call('HGET', K.counts, 'available') or '0')
  return DEFERRED and n + (DEFERRED.counts.available or 0) or n
end

-- Codes available now, and the sum of the pools.
local function pool_totals()
  local available = available_codes()
  local reserved = tonumber(redis.call('HGET', K.pools, '*') or '0')
  return available, reserved
end

-- Whether the SKU has no pool at all (`pools` is empty), asked at the first draw of a call
-- that may share (nil: not yet asked) and forgotten at any change of a pool.
local NO_POOLS = nil

-- Adds `n` (negative: takes) to `pool`'s reservation and to the sum.
local function add_to_pool(pool, n)
  if n == 0 then return end
  NO_POOLS = nil
  local left = redis.call('HINCRBY', K.pools, pool, int(n))
  if left == 0 then redis.call('HDEL', K.pools, pool) end
  local total = redis.call('HINCRBY', K.pools, '*', int(n))
  if total == 0 then redis.call('HDEL', K.pools, '*') end
end

-- Restores the invariant after available codes left other than through a claim (a void, an
-- expired code retired, a repair): when the pools reserve more than is available, the
-- excess comes off the largest pools first (ties: the first name), each change an event.
local function fit_pools(now, why)
  local available, reserved = pool_totals()
  local excess = reserved - available
  if excess <= 0 then return end
  local flat = redis.call('HGETALL', K.pools)
  local pools = {}
  for i = 1, #flat, 2 do
    if flat[i] ~= '*' then pools[#pools + 1] = { flat[i], tonumber(flat[i + 1]) } end
  end
  table.sort(pools, function(a, b)
    if a[2] ~= b[2] then return a[2] > b[2] end
    return a[1] < b[1]
  end)
  local answer = EMITTED
  for _, p in ipairs(pools) do
    if excess <= 0 then break end
    local cut = math.min(p[2], excess)
    add_to_pool(p[1], -cut)
    excess = excess - cut
    local eid = emit('pool', now, { 'pool', p[1], 'delta', -cut, 'reason', why })
    redis.call('HSET', K.meta, 'pool_event', eid)
  end
  EMITTED = answer -- not the change a client is answered about
end

-- How many of `qty` codes an order of channel `pool` takes from its pool, or nil and the
-- codes available to anyone (for the sold_out reply) when its pool and, if `share`, the
-- shared remainder cannot cover it. With no pool anywhere, every code is shared: one read
-- per call answers for every order of a batch (see NO_POOLS).
local function draw(pool, qty, share)
  if share then
    if NO_POOLS == nil then NO_POOLS = redis.call('EXISTS', K.pools) == 0 end
    if NO_POOLS then return 0 end
  end
  local p = redis.call('HMGET', K.pools, '*', pool)
  local reserved = tonumber(p[1] or '0')
  if reserved == 0 and share then return 0 end
  local mine = math.min(tonumber(p[2] or '0'), qty)
  local rest = qty - mine
  if rest == 0 then return mine end
  local available = available_codes()
  if share and available - reserved >= rest then return mine end
  return nil, available
end

-- Gives codes of an order back to the pool they were drawn from: of `returned` codes
-- that went back on sale, up to the order's `pooled`. Returns how many went to the pool.
local function give_back(o, returned)
  local back = math.min(o.pooled or 0, returned)
  if o.pool and o.pool ~= '' and back > 0 then
    add_to_pool(o.pool, back)
    return back
  end
  return 0
end

-- Pops `qty` issuable keys, all or none. Returns their ids and their records (id → decoded
-- record, for `issue`, so it need not read them again), or nil and how many issuable keys
-- there were when stock is short (0: none at all, the SKU is sold out for everyone); last,
-- how many expired keys it retired (the caller then fits the pools, once its own draw is
-- taken from them). A key listed twice is taken once.
-- Keys past their `expires_at` are never issued: they are retired (voided with reason
-- `expired`, one event for all of them) as they come up.
local function take(qty, now)
  local got, expired, recs = {}, {}, {}
  while #got < qty do
    local batch = redis.call('LPOP', K.avail, int(qty - #got))
    if not batch then break end
    for _, id in ipairs(batch) do
      local k = not recs[id] and load_key(id)
      if k then
        k.listed = false -- popped: its one entry is gone
        if not issuable(k) then
          -- A stale entry: dropped, never issued; the record learns it is unlisted.
          redis.call('HSET', K.keys, id, encode_key(k))
        elseif k.expires_at > 0 and now >= k.expires_at then
          local before = snapshot(k)
          k.void = true
          save_key(id, before, k)
          expired[#expired + 1] = id
        else
          got[#got + 1] = id
          recs[id] = k
        end
      end
    end
  end
  if #expired > 0 then
    local answer = EMITTED
    emit('void', now, { 'ids', table.concat(expired, ','), 'reason', 'expired',
      'before', 'available' })
    EMITTED = answer -- not the change a client is answered about
  end
  if #got < qty then
    -- Back at the head, in order; their records still say listed (never saved here).
    for i = #got, 1, -1 do redis.call('LPUSH', K.avail, got[i]) end
    return nil, #got, nil, #expired
  end
  return got, nil, recs, #expired
end

-- Marks freshly taken keys (`recs`: their records as `take` read them) as held or sold by
-- one more order.
local function issue(ids, held, recs)
  for _, id in ipairs(ids) do
    local k = recs[id]
    local before = snapshot(k)
    if held then k.held = k.held + 1 else k.sold = k.sold + 1 end
    save_key(id, before, k)
  end
end

-- Returns a hold's keys: each key is held by one order fewer. Returns how many of them
-- became available again.
local function unhold(ids)
  local returned = 0
  for _, id in ipairs(ids) do
    local k = load_key(id)
    if k then
      local before = snapshot(k)
      k.held = math.max(k.held - 1, 0)
      save_key(id, before, k)
      if before ~= 'available' and key_state(k) == 'available' then returned = returned + 1 end
    end
  end
  return returned
end

-- Lapses one held order whose time is up: its codes go back to inventory, to the pool they
-- were drawn from.
local function expire_order(order_id, o, now)
  local back = give_back(o, unhold(o.ids))
  add_user_codes(o.user, -o.qty)
  o.state = 'expired'
  o.updated_at = now
  o.eid = emit('expire', now, { 'order', order_id, 'user', o.user, 'ids', table.concat(o.ids, ','),
    'pool', o.pool or '', 'pooled', back })
  save_order(order_id, o)
  redis.call('ZREM', K.holds, order_id)
end

-- Order `order_id` as of `now` (nil when unknown), its hold lapsed first if it is due: a
-- lapsed hold is never observed or acted on as held.
local function current_order(order_id, now)
  local o = decode_order(redis.call('HGET', K.orders, order_id))
  if o and o.state == 'held' and now >= o.expires_at then
    expire_order(order_id, o, now)
  end
  return o
end

-- Lapses up to `limit` holds that are due. Scripts that issue or read orders call it first,
-- so an expired hold is never observed as held and its stock is never missed.
local function expire_due(now, limit)
  local due = redis.call('ZRANGEBYSCORE', K.holds, '-inf', int(now), 'LIMIT', '0', int(limit))
  for _, order_id in ipairs(due) do
    local o = decode_order(redis.call('HGET', K.orders, order_id))
    if o and o.state == 'held' then
      expire_order(order_id, o, now)
    else
      redis.call('ZREM', K.holds, order_id)
    end
  end
  return #due
end

-- The reply describing an order:
-- {tag, state, expires_at, late, eid, event, id, code, id, code, ...}, where event is the
-- change this call made (EMITTED; empty for a replay). Codes are revealed only once the
-- order is final: a hold's codes may go back on sale.
local function order_reply(tag, o)
  local reply = { tag, o.state, o.expires_at, o.late and 1 or 0, o.eid, EMITTED }
  local codes = {}
  if o.state == 'claimed' and #o.ids > 0 then
    codes = redis.call('HMGET', K.codes, unpack(o.ids))
  end
  for i, id in ipairs(o.ids) do
    reply[#reply + 1] = id
    reply[#reply + 1] = codes[i] or ''
  end
  return reply
end

-- Claims `qty` codes for order `order_id` of channel `pool` (claim.lua, claims_batch.lua):
-- from the channel's pool first, then, if `share`, from the shared remainder. The reply of
-- claim.lua for this one order. The caller checked the SKU serves and lapsed due holds.
-- An order id that may have been retired answers {'moved'} unless `fresh` (the ledger has
-- no such order: its fingerprint is another order's).
local function claim_order(order_id, qty, user, hold_ms, now, pool, share, fresh)
  EMITTED = {} -- this order's change only (a batch claims several)
  local existing = decode_order(redis.call('HGET', K.orders, order_id))
  if existing then
    if existing.qty ~= qty or existing.user ~= user or existing.hold_ms ~= hold_ms then
      return { 'conflict' }
    end
    return order_reply('replay', existing)
  end
  if not fresh and may_be_retired(order_id) then return { 'moved' } end

  local limited = check_user_limit(user, qty)
  if limited then return limited end

  local pooled, available = draw(pool, qty, share)
  if not pooled then return { 'sold_out', available } end
  local ids, issuable_left, recs, retired = take(qty, now)
  if not ids then
    if retired > 0 then fit_pools(now, 'expired') end
    return { 'sold_out', issuable_left }
  end
  local held = hold_ms > 0
  issue(ids, held, recs)
  add_user_codes(user, qty)
  add_to_pool(pool, -pooled)
  -- Codes found expired on the way left the available ones; if that leaves the pools more
  -- than is available, the pools shrink, as for any void.
  if retired > 0 then fit_pools(now, 'expired') end

  local o = {
    state = held and 'held' or 'claimed', qty = qty, user = user, hold_ms = hold_ms,
    expires_at = held and (now + hold_ms) or 0, late = false, created_at = now,
    updated_at = now, ids = ids, pool = pool, pooled = pooled,
  }
  -- Reported in short (see EMITTED): the gateway rebuilds these very fields.
  local eid, id = append(held and 'hold' or 'claim', now, {
    'order', order_id, 'user', user, 'ids', table.concat(ids, ','),
    'expires_at', int(o.expires_at), 'hold_ms', int(hold_ms), 'qty', int(qty), 'pool', pool,
    'pooled', int(pooled),
  }, true)
  o.eid, EMITTED = eid, { id, int(pooled) }
  save_order(order_id, o)
  if held then redis.call('ZADD', K.holds, int(o.expires_at), order_id) end
  return order_reply('new', o)
end

-- The sold code whose canonical form under one of the SKU's format versions has one of the
-- digests argv[first..last] (the newest version first; `argv` is the call's ARGV, which the
-- prelude cannot name): its key id, record and which digest matched (from 1), or nil. Every
-- digest is looked up, whichever matches: the work does not tell which version a code
-- belongs to. Runs before unservable (see redeem.lua): a decoy call for an unknown code,
-- against a SKU that does not exist, must cost what a lookup costs.
local function find_sold(argv, first, last)
  local id, k, matched = nil, nil, 0
  for i = first, last do
    local found = redis.call('HGET', K.idx, argv[i])
    if found and not id then
      local key = load_key(found)
      if key and not key.void and key.sold > 0 then id, k, matched = found, key, i - first + 1 end
    end
  end
  return id, k, matched
end

-- redeem.lua for the code find_sold found (`id`, its record `k`, `matched`) or did not
-- (nil), once the SKU is known to serve. Its reply as redeem.lua's.
local function redeem_found(id, k, matched, redeemer, now, paused)
  if not id then return { 'invalid' } end
  if k.expires_at > 0 and now >= k.expires_at then return { 'expired', k.expires_at } end

  local mark = id .. '|' .. redeemer
  local previous = redis.call('HGET', K.redemptions, mark)
  if previous then
    local at, eid = string.match(previous, '^(%d+)|?(.*)$')
    return { 'replay', id, at, eid, {}, matched }
  end
  if k.uses >= k.max_uses then
    -- The last redeemer asking again, after the redemption marks were lost with the engine's
    -- data (the key itself comes back from the ledger): the same answer as the first time.
    if k.redeemer == redeemer then
      return { 'replay', id, tostring(k.redeemed_at), '', {}, matched }
    end
    return { 'used', k.redeemed_at, k.redeemer }
  end

  if paused then return { 'paused' } end

  local before = snapshot(k)
  k.uses = k.uses + 1
  k.redeemer = redeemer
  k.redeemed_at = now
  save_key(id, before, k)
  -- Reported in short, {stream id, uses}: the gateway rebuilds the other fields, which it
  -- sent or this reply carries (see EMITTED).
  local eid, sid = append('redeem', now, { 'ids', id, 'redeemer', redeemer, 'uses', k.uses })
  redis.call('HSET', K.redemptions, mark, int(now) .. '|' .. eid)
  -- The code's last use: its record now answers this redeemer's retry as the mark does (see
  -- the replay above), so the mark may retire (retire.lua). Marks of earlier uses of a
  -- reusable code stay: only they tell those redeemers' retries from new redemptions.
  if k.uses >= k.max_uses then
    redis.call('RPUSH', K.settled, int(now) .. '|' .. mark)
  end
  return { 'new', id, now, eid, { sid, int(k.uses) }, matched }
end

-- Defers the writes listed at DEFERRED until `flush`, for the rest of this call.
local function defer()
  DEFERRED = { counts = {}, settled = {} }
end

-- Most entries one RPUSH of `flush` carries (`unpack` has a limit of its own, and a
-- command of a few hundred arguments costs no more per argument than a longer one).
local FLUSH_CHUNK = 512

-- Makes the deferred writes. A deferring script calls it before it returns, also when a
-- command failed on the way (claim.lua): what the call did before the failure stays, as it
-- would without deferring.
local function flush()
  local d = DEFERRED
  if not d then return end
  DEFERRED = nil
  for state, n in pairs(d.counts) do
    if n ~= 0 then redis.call('HINCRBY', K.counts, state, int(n)) end
  end
  for i = 1, #d.settled, FLUSH_CHUNK do
    redis.call('RPUSH', K.settled, unpack(d.settled, i, math.min(i + FLUSH_CHUNK - 1, #d.settled)))
  end
end

-- Starts a script call: refuses it if it comes too late (below), names its keys (in the order
-- listed at the top) and clears what an earlier call left in the per-call state, which a
-- library keeps between calls.
--
-- Every call's last argument is its deadline, ms since the epoch by the caller's clock, or ''
-- for none; it is taken off here, so a script never sees it. A call that starts after its
-- deadline runs nothing and raises LATE: its caller has given up on it and answered it as
-- failed, and what the client did next (a retry through another gateway, the void's restore)
-- must not be undone by this call arriving now.
local function begin(keys, argv)
  string, table, math, tonumber, type, ipairs, pairs, unpack = run_time_globals()
  local last = #argv
  local deadline = argv[last]
  argv[last] = nil
  if deadline ~= '' then
    local time = redis.call('TIME')
    -- Arithmetic turns the texts into numbers: cheaper than calls of tonumber, on every call.
    if time[1] * 1000 + time[2] / 1000 > deadline + 0 then
      error({ err = 'LATE the call reached the engine after its deadline and ran nothing' })
    end
  end
  K = {
    meta = keys[1], avail = keys[2], keys = keys[3], codes = keys[4], idx = keys[5],
    orders = keys[6], holds = keys[7], users = keys[8], redemptions = keys[9],
    counts = keys[10], events = keys[11], pools = keys[12], settled = keys[13],
    retired = keys[14],
  }
  EMITTED = {}
  GEN = nil
  ANY_RETIRED = nil
  NO_POOLS = nil
  DEFERRED = nil
end
