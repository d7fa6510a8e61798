-- wrk: claims of one code each, every request a new order (ORDER_PREFIX keeps runs apart).
-- Env: TOKEN (merchant bearer token, may be empty), ORDER_PREFIX, ORDER_IDS: `counted`
-- (the default: the prefix and a count, ids that sort nearly in the order they are made,
-- as an order system's numbers do) or `random` (the prefix and 64 random bits, as UUIDs).
local token = os.getenv("TOKEN") or ""
local prefix = os.getenv("ORDER_PREFIX") or "o"
local random = os.getenv("ORDER_IDS") == "random"
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

request = function()
  return wrk.format("POST", nil, headers, '{"order_id":"' .. order_id() .. '"}')
end
