-- store_script: used by chat.response_cache.storage
local index = KEYS[1]
local prefix = ARGV[1]
local now = tonumber(ARGV[2])
local tenant_cap = tonumber(ARGV[3])
local scope_cap = tonumber(ARGV[4])
local member = ARGV[5]
local expires = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local drop_limit = tonumber(ARGV[8])
local generation = ARGV[9]

local function drop(m)
  local bar = string.find(m, '|', 1, true)
  if bar then
    local scope = prefix .. string.sub(m, 1, bar - 1)
    local entry = string.sub(m, bar + 1)
    redis.call('HDEL', scope .. ':v', entry)
    redis.call('HDEL', scope .. ':a', entry)
    redis.call('ZREM', scope .. ':i', entry)
    if redis.call('EXISTS', scope .. ':g') == 1 then
      redis.call('SET', scope .. ':g', generation, 'KEEPTTL')
    end
  else
    redis.call('UNLINK', prefix .. m)
  end
  redis.call('ZREM', index, m)
end

local function extend(key)
  if redis.call('TTL', key) < ttl then
    redis.call('EXPIRE', key, ttl)
  end
end

redis.call('ZADD', index, expires, member)
extend(index)
local evicted = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, drop_limit)) do
  drop(m)
end
local bar = string.find(member, '|', 1, true)
if bar then
  local scope = string.sub(member, 1, bar - 1)
  local scope_index = prefix .. scope .. ':i'
  redis.call('ZADD', scope_index, expires, string.sub(member, bar + 1))
  extend(scope_index)
  local over = redis.call('ZCARD', scope_index) - scope_cap
  if over > 0 then
    for _, entry in ipairs(redis.call('ZRANGE', scope_index, 0, over - 1)) do
      drop(scope .. '|' .. entry)
      evicted = evicted + 1
    end
  end
end
local over = redis.call('ZCARD', index) - tenant_cap
if over > 0 then
  for _, m in ipairs(redis.call('ZRANGE', index, 0, over - 1)) do
    drop(m)
    evicted = evicted + 1
  end
end
return evicted
