-- name: delay_add
-- version: 1
-- purpose: park a message in its queue's delayed set until it is due. The due time is the Redis
--          server's clock plus the delay, so producers' and workers' clocks never matter.
-- KEYS[1]: the queue's delayed set (a sorted set in the queue's slot: {queue}:delayed)
-- ARGV[1]: the delay in milliseconds, a whole number of at least 1
-- ARGV[2]: the member: "<unique hex id>:<priority level>:" followed by the message bytes
-- returns: the due time in milliseconds of the server's clock

local delay = tonumber(ARGV[1])
if not delay or delay < 1 or delay ~= math.floor(delay) then
    return redis.error_reply('delay_add: the delay must be a whole number of milliseconds >= 1')
end
local now = redis.call('TIME')
local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + delay
redis.call('ZADD', KEYS[1], due, ARGV[2])
return due
