-- wrk: redemptions of sold codes <SKU>-<i> (i below CODES), every request a new redeemer.
-- Env: SKU, CODES, ORDER_PREFIX.
local sku = os.getenv("SKU") or "sbs"
local codes = tonumber(os.getenv("CODES") or "1")
local prefix = os.getenv("ORDER_PREFIX") or "r"
local n = 0
local headers = { ["Content-Type"] = "application/json" }

request = function()
  n = n + 1
  local body = '{"code":"' .. sku .. "-" .. (n % codes) .. '","redeemer":"' .. prefix .. "-" ..
    n .. '","sku":"' .. sku .. '"}'
  return wrk.format("POST", nil, headers, body)
end
