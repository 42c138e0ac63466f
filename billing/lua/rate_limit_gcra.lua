-- gcra: billing.ratelimit
local mode = ARGV[1]
local limits = #KEYS
if mode == 'mark' then limits = limits - 1 end
local now
if ARGV[2] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
else
  now = tonumber(ARGV[2])
end

local debts = {}  -- key -> scaled debt decided by this call (a key may be named twice)
local admitted, first_refused, retry = 1, 0, 0
local results = {}
for i = 1, limits do
  local key = KEYS[i]
  local base = 3 + (i - 1) * 4
  local count, period = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
  local burst, cost = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local debt = debts[key]
  if debt == nil then
    debt = 0
    local value = redis.call('GET', key)
    if value then
      local tat, remainder = string.match(value, '^(%d+):?(%d*)$')
      if tat then
        debt = math.max(0, (tonumber(tat) - now) * count + (tonumber(remainder) or 0))
      end
    end
  end
  local capacity = burst * period
  local after = math.max(0, debt + cost * period)
  local refuse_us = 0
  if mode ~= 'charge' then
    if cost > burst then
      -- Larger than the burst: admitted only on a full cell, leaving it in debt.
      if debt > 0 then refuse_us = math.ceil(debt / count) end
    elseif after > capacity then
      refuse_us = math.ceil((after - capacity) / count)
    end
  end
  if refuse_us > 0 then
    admitted = 0
    if first_refused == 0 then first_refused = i end
    retry = math.max(retry, refuse_us)
  end
  debts[key] = after
  results[i] = {debt, after, count, period, capacity}
end

local consumed = mode == 'charge' or ((mode == 'check' or mode == 'mark') and admitted == 1)
local reply = {admitted, first_refused, retry}
for i = 1, limits do
  local debt, after, count, period, capacity = unpack(results[i])
  if consumed then debt = after end
  reply[#reply + 1] = math.max(0, math.floor((capacity - debt) / period))
  reply[#reply + 1] = math.ceil(debt / count)
end
if consumed then
  local written = {}
  for i = 1, limits do
    local key = KEYS[i]
    if not written[key] then
      written[key] = true
      local debt, count = debts[key], results[i][3]
      if debt > 0 then
        local ahead, remainder = math.floor(debt / count), debt % count
        local value = string.format('%.0f', now + ahead)
        if remainder > 0 then value = value .. ':' .. string.format('%.0f', remainder) end
        redis.call('SET', key, value, 'PX', string.format('%.0f', math.ceil(debt / count / 1000)))
      else
        redis.call('DEL', key)
      end
    end
  end
  if mode == 'mark' then redis.call('SET', KEYS[limits + 1], '1', 'PX', 60000) end
end
return reply
