-- name: stream_ack
-- version: 2
-- purpose: acknowledge stream entries for a consumer group, then delete from the stream each one
--          that every consumer group of the stream has delivered and acknowledged (so the stream
--          does not grow without bound, and no group ever loses an entry it still needs). With
--          dead-letter fields, they are first added to the dead-letter stream as one entry.
--          Many ids per call: the acks a worker gathers during one round trip go as one call.
--          Bounded by the number of ids passed times the number of consumer groups.
-- KEYS[1]: the stream (the queue)
-- KEYS[2]: the queue's dead-letter stream, in the same slot ({queue}:dead)
-- ARGV[1]: the consumer group acknowledging
-- ARGV[2]: n, how many dead-letter field and value items follow (0: no dead letter)
-- ARGV[3...2+n]: field, value pairs added to KEYS[2] as one entry before anything else
-- ARGV[3+n...]: the entry ids to acknowledge (a few thousand at most)
-- returns: {how many ids were pending and are now acknowledged, how many entries were deleted}

local stream, group = KEYS[1], ARGV[1]
local n = tonumber(ARGV[2])
if n > 0 then
    redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3, 2 + n))
end

local acked, ids, ours = 0, {}, {}
for i = 3 + n, #ARGV do
    local one = redis.call('XACK', stream, group, ARGV[i])
    acked = acked + one
    ids[#ids + 1] = ARGV[i]
    ours[#ids] = one == 1
end
if #ids == 0 or redis.call('EXISTS', stream) == 0 then
    return {acked, 0}
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

local groups = {}
for _, group_info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #group_info, 2 do
        info[group_info[i]] = group_info[i + 1]
    end
    groups[#groups + 1] = info
end

-- An entry may go once every group has delivered it and none still holds it. The acknowledging
-- group is done with an entry its XACK just took from its pending list.
local deletable = {}
for i, id in ipairs(ids) do
    local done = true
    for _, info in ipairs(groups) do
        if not (ours[i] and info['name'] == group) then
            if not id_le(id, info['last-delivered-id'])
                or (info['pending'] > 0
                    and #redis.call('XPENDING', stream, info['name'], id, id, 1) > 0) then
                done = false
                break
            end
        end
    end
    if done then
        deletable[#deletable + 1] = id
    end
end
if #deletable == 0 then
    return {acked, 0}
end
return {acked, redis.call('XDEL', stream, unpack(deletable))}
