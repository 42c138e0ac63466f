-- reserve: billing.budgets (after budget_alerts.lua)
if redis.call('EXISTS', KEYS[2]) == 1 then return {2} end
local tokens = tonumber(ARGV[1])
local n = tonumber(ARGV[7])
local used = {}
local missing = {}
for i = 1, n do
  local value = redis.call('HGET', KEYS[1], ARGV[5 + 3 * i])
  if value then used[i] = tonumber(value) else table.insert(missing, ARGV[5 + 3 * i]) end
end
if #missing > 0 then return {-1, unpack(missing)} end
for i = 1, n do
  local limit = tonumber(ARGV[6 + 3 * i])
  if ARGV[7 + 3 * i] == '1' and used[i] + tokens > limit then
    return {0, ARGV[5 + 3 * i], used[i], limit}
  end
end
local alerts = {}
redis.call('HSET', KEYS[2], 'state', 'reserved', 'tokens', tokens)
for i = 1, n do
  local field = ARGV[5 + 3 * i]
  local limit = tonumber(ARGV[6 + 3 * i])
  local after = redis.call('HINCRBY', KEYS[1], field, tokens)
  redis.call('HSET', KEYS[2], 'l:' .. field, ARGV[6 + 3 * i] .. '|' .. ARGV[7 + 3 * i])
  check_thresholds(KEYS[1], field, used[i], after, limit, ARGV[7 + 3 * i], ARGV[6], alerts)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return {1, unpack(alerts)}
