-- admit_script: used by chat.providers.circuit
local fields = redis.call('HMGET', KEYS[1], 'state', 'failures', 'open_until', 'probe_until')
local state = tonumber(fields[1]) or 0
local failures = tonumber(fields[2]) or 0
local now = tonumber(ARGV[1])
if state == 0 then return {1, 0, failures} end
if state == 2 and now < (tonumber(fields[3]) or 0) then return {0, 2, failures} end
if state == 1 and now < (tonumber(fields[4]) or 0) then return {0, 1, failures} end
redis.call('HSET', KEYS[1], 'state', 1, 'probe_until', tostring(now + tonumber(ARGV[2])))
return {1, 1, failures}
