-- write_and_notify: used by chat.streams
local previous = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local parts = {KEYS[1], previous[1] and previous[1][1] or '0-0'}
for index = 5, #ARGV, 2 do
  parts[#parts + 1] = redis.call(
    'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[index], 'data', ARGV[index + 1])
  parts[#parts + 1] = ARGV[index]
  parts[#parts + 1] = ARGV[index + 1]
end
if ARGV[2] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], '')
redis.call('PUBLISH', ARGV[4], table.concat(parts, '\n'))
return #parts
