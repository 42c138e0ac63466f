-- release: billing.budgets
local state = redis.call('HGET', KEYS[2], 'state')
redis.call('ZREM', KEYS[3], ARGV[1])
if state ~= 'reserved' then return 0 end
local tokens = tonumber(redis.call('HGET', KEYS[2], 'tokens'))
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local field = string.sub(all[i], 3)
  if string.sub(all[i], 1, 2) == 'l:' and redis.call('HEXISTS', KEYS[1], field) == 1 then
    redis.call('HINCRBY', KEYS[1], field, -tokens)
  end
end
redis.call('HSET', KEYS[2], 'state', 'expired')
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
