-- merge: used by chat.memory.hot_store
local cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local seen, merged = {}, {}
local function add(raw)
    local record = cjson.decode(raw)
    if not seen[record.id] then
        seen[record.id] = true
        merged[#merged + 1] = {record.ts, record.id, raw}
    end
end
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do add(raw) end
for index = 3, #ARGV do add(ARGV[index]) end
table.sort(merged, function(a, b)
    if a[1] == b[1] then return a[2] < b[2] end
    return a[1] < b[1]
end)
redis.call('DEL', KEYS[1])
local first = math.max(1, #merged - cap + 1)
for index = first, #merged do redis.call('RPUSH', KEYS[1], merged[index][3]) end
if #merged > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
redis.call('SET', KEYS[2], '1', 'EX', ttl)
return #merged - first + 1
