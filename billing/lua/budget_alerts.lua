-- check_thresholds: the budget scripts' shared alert check (billing.budgets)
local function check_thresholds(counters, field, before, after, limit, hard, thresholds, alerts)
  if limit <= 0 then return end
  for pct in string.gmatch(thresholds, '%d+') do
    local p = tonumber(pct)
    if before * 100 < limit * p and after * 100 >= limit * p then
      if redis.call('HSETNX', counters, 'alert:' .. pct .. ':' .. field, 1) == 1 then
        table.insert(alerts, field)
        table.insert(alerts, p)
        table.insert(alerts, after)
        table.insert(alerts, limit)
        table.insert(alerts, hard)
      end
    end
  end
end
