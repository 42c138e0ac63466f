-- append: used by chat.memory.hot_store
local cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
for index = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[index]) end
redis.call('LTRIM', KEYS[1], -cap, -1)
redis.call('EXPIRE', KEYS[1], ttl)
if ARGV[3] == '1' then
    redis.call('SET', KEYS[2], '1', 'EX', ttl)
else
    redis.call('EXPIRE', KEYS[2], ttl)
end
return redis.call('LLEN', KEYS[1])
