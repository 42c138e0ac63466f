-- gate_script: used by chat.admission
local holds = redis.call('EXISTS', KEYS[2]) == 0
local k = 3
if ARGV[1] == '1' then
  holds = redis.call('DEL', KEYS[k]) == 1 and holds
  k = k + 1
end
if ARGV[2] == '1' then
  holds = holds and redis.call('EXISTS', KEYS[k]) == 1
  k = k + 1
end
for i = k, #KEYS do
  if not holds then break end
  holds = redis.call('GET', KEYS[i]) == ARGV[i - k + 3]
end
if holds then return 1 end
redis.call('SET', KEYS[1], '1', 'PX', 60000)
return 0
