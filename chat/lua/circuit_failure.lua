-- failure_script: used by chat.providers.circuit
local state = tonumber(redis.call('HGET', KEYS[1], 'state')) or 0
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if state == 1 or (state == 0 and failures >= tonumber(ARGV[2])) then
  state = 2
  redis.call('HSET', KEYS[1], 'state', 2, 'open_until', tostring(tonumber(ARGV[1]) + tonumber(ARGV[3])),
             'probe_until', 0)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return state
