-- name: stream_ack
-- version: 1
-- purpose: acknowledge one stream entry for a consumer group, then delete it from the stream if
--          every consumer group of the stream has delivered and acknowledged it (so the stream
--          does not grow without bound, and no group ever loses an entry it still needs). With
--          dead-letter fields, the entry is first copied to the dead-letter stream. Bounded by
--          the number of consumer groups of the stream.
-- KEYS[1]: the stream (the queue)
-- KEYS[2]: the queue's dead-letter stream, in the same slot ({queue}:dead)
-- ARGV[1]: the consumer group acknowledging
-- ARGV[2]: the entry id
-- ARGV[3...]: optional field, value pairs; when given, they are added to KEYS[2] as one entry first
-- returns: {1 if the entry was pending and is now acknowledged else 0, 1 if it was deleted else 0}

local stream, group, id = KEYS[1], ARGV[1], ARGV[2]

if #ARGV > 2 then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
end
local acked = redis.call('XACK', stream, group, id)
if acked == 0 and redis.call('EXISTS', stream) == 0 then
    return {0, 0}
end

-- Whole decimal numbers as Redis writes them (no sign, no leading zeros) compare by length first.
local function number_le(a, b)
    if #a ~= #b then
        return #a < #b
    end
    return a <= b
end

-- Whether stream id a ("ms-seq") is at or before stream id b.
local function id_le(a, b)
    local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
    local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
    if not (a_ms and b_ms) then
        return false
    end
    if a_ms ~= b_ms then
        return number_le(a_ms, b_ms)
    end
    return number_le(a_seq, b_seq)
end

for _, group_info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #group_info, 2 do
        info[group_info[i]] = group_info[i + 1]
    end
    if not id_le(id, info['last-delivered-id']) then
        return {acked, 0}
    end
    if info['pending'] > 0 and #redis.call('XPENDING', stream, info['name'], id, id, 1) > 0 then
        return {acked, 0}
    end
end
return {acked, redis.call('XDEL', stream, id)}
