-- settle: billing.budgets (after budget_alerts.lua)
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'settled' then return {0} end
local delta = tonumber(ARGV[1])
local fields = {}
local limits = {}
if state then
  if state == 'reserved' then delta = delta - tonumber(redis.call('HGET', KEYS[2], 'tokens')) end
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'l:' then
      table.insert(fields, string.sub(all[i], 3))
      table.insert(limits, all[i + 1])
    end
  end
else
  for i = 1, tonumber(ARGV[5]) do
    table.insert(fields, ARGV[5 + i])
    table.insert(limits, false)
  end
end
local alerts = {}
if delta ~= 0 then
  for i, field in ipairs(fields) do
    if redis.call('HEXISTS', KEYS[1], field) == 1 then
      local after = redis.call('HINCRBY', KEYS[1], field, delta)
      if limits[i] and delta > 0 then
        local limit, hard = string.match(limits[i], '^(%d+)|(%d)$')
        check_thresholds(KEYS[1], field, after - delta, after, tonumber(limit), hard, ARGV[4], alerts)
      end
    end
  end
end
redis.call('HSET', KEYS[2], 'state', 'settled')
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[2])
return {1, unpack(alerts)}
