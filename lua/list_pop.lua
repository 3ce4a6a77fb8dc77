-- name: list_pop
-- version: 1
-- purpose: take a bounded batch of the oldest messages of a list queue in one atomic step,
--          so a busy queue costs one round trip per batch instead of one per message.
--          Producers LPUSH, so the oldest message sits at the tail. LRANGE + LTRIM rather
--          than RPOP with a count, which needs Redis 6.2.
-- KEYS[1]: the queue (a list named queue_name)
-- ARGV[1]: the most messages to take, a whole number from 1 to 1000
-- returns: the messages taken, oldest first; an empty array when the queue is empty

local count = tonumber(ARGV[1])
if not count or count < 1 or count > 1000 then
    return redis.error_reply('list_pop: batch size must be a whole number from 1 to 1000')
end
local newest_first = redis.call('LRANGE', KEYS[1], -count, -1)
local taken = #newest_first
if taken == 0 then
    return newest_first
end
redis.call('LTRIM', KEYS[1], 0, -taken - 1)
local oldest_first = {}
for i = taken, 1, -1 do
    oldest_first[#oldest_first + 1] = newest_first[i]
end
return oldest_first
