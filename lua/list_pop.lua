-- name: list_pop
-- version: 2
-- purpose: take a bounded batch of the oldest messages of a list queue in one atomic step,
--          so a busy queue costs one round trip per batch instead of one per message.
--          The keys are the queue's priority levels, highest first: the batch comes from the
--          first key that holds messages, so a level is read only while every higher one is
--          empty. Producers LPUSH, so the oldest message sits at the tail. LRANGE + LTRIM
--          rather than RPOP with a count, which needs Redis 6.2.
-- KEYS[1...]: the queue's level keys, highest level first (only the queue itself when it has
--             no levels); the batch is taken from one of them
-- ARGV[1]: the most messages to take, a whole number from 1 to 1000
-- returns: {the position in KEYS of the key taken from, {the messages taken, oldest first}};
--          an empty array when every key is empty

local count = tonumber(ARGV[1])
if not count or count < 1 or count > 1000 or count ~= math.floor(count) then
    return redis.error_reply('list_pop: batch size must be a whole number from 1 to 1000')
end
for position, key in ipairs(KEYS) do
    local newest_first = redis.call('LRANGE', key, -count, -1)
    local taken = #newest_first
    if taken > 0 then
        redis.call('LTRIM', key, 0, -taken - 1)
        local oldest_first = {}
        for i = taken, 1, -1 do
            oldest_first[#oldest_first + 1] = newest_first[i]
        end
        return {position, oldest_first}
    end
end
return {}
