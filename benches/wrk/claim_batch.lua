-- wrk: batch claims, BATCH orders of one code each per request, every order new.
-- Env: TOKEN (merchant bearer token), ORDER_PREFIX, BATCH.
local token = os.getenv("TOKEN") or ""
local prefix = os.getenv("ORDER_PREFIX") or "b"
local batch = tonumber(os.getenv("BATCH") or "100")
local n = 0
local headers = { ["Content-Type"] = "application/json" }
if token ~= "" then headers["Authorization"] = "Bearer " .. token end

request = function()
  local claims = {}
  for i = 1, batch do
    n = n + 1
    claims[i] = '{"order_id":"' .. prefix .. "-" .. n .. '"}'
  end
  return wrk.format("POST", nil, headers, '{"claims":[' .. table.concat(claims, ",") .. "]}")
end
