-- wrk: claims of one code each, every request a new order (ORDER_PREFIX keeps runs apart).
-- Env: TOKEN (merchant bearer token, may be empty), ORDER_PREFIX.
local token = os.getenv("TOKEN") or ""
local prefix = os.getenv("ORDER_PREFIX") or "o"
local n = 0
local headers = { ["Content-Type"] = "application/json" }
if token ~= "" then headers["Authorization"] = "Bearer " .. token end

request = function()
  n = n + 1
  return wrk.format("POST", nil, headers, '{"order_id":"' .. prefix .. "-" .. n .. '"}')
end
