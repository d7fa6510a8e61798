-- wrk: claims of one code each, every request a new order (ORDER_PREFIX keeps runs apart).
-- Env: TOKEN (merchant bearer token, may be empty), ORDER_PREFIX, ORDER_IDS: `counted`
-- (the default: the prefix and a count, ids that sort nearly in the order they are made,
-- as an order system's numbers do) or `random` (the prefix and 64 random bits, as UUIDs).
-- SKUS=N (default 1) spreads the claims over N SKUs in turn: the URL's SKU (`sbs`), then
-- `sbs1` … `sbs<N-1>` (as benches/lib.sh stocks them), each at the same path otherwise.
local token = os.getenv("TOKEN") or ""
local prefix = os.getenv("ORDER_PREFIX") or "o"
local random = os.getenv("ORDER_IDS") == "random"
local skus = tonumber(os.getenv("SKUS") or "1")
local n = 0
local headers = { ["Content-Type"] = "application/json" }
if token ~= "" then headers["Authorization"] = "Bearer " .. token end
math.randomseed(os.time())

local function order_id()
  n = n + 1
  if random then
    return string.format("%s-%08x%08x-%d", prefix, math.random(0, 0x7fffffff),
      math.random(0, 0x7fffffff), n)
  end
  return prefix .. "-" .. n
end

-- The path for the n-th claim (nil: the URL's own).
local function path()
  local i = n % skus
  if i == 0 then return nil end
  return (wrk.path:gsub("/skus/sbs/", "/skus/sbs" .. i .. "/"))
end

request = function()
  local body = '{"order_id":"' .. order_id() .. '"}'
  return wrk.format("POST", path(), headers, body)
end
