-- name: schedule_fetch
-- version: 2
-- purpose: one bounded page of the schedules a list schedule source hands to the scheduler,
--          read from the index in member order from a cursor that is a member, not an offset:
--          writers adding or removing other schedules cannot shift it, so a schedule that stays
--          in the index for the whole read is returned. First, ids that taskiq-redis 1.2 pushed
--          to its lists (KEYS[3...]) are moved into the index (at most ARGV[2] of them), so a
--          1.2 process that still adds schedules is not ignored.
-- KEYS[1]: the index ({prefix}__schedules, every score 0, members placement .. id: "c" cron,
--          "i" interval, "t" + YYYY-MM-DDTHH:MM timed)
-- KEYS[2]: the placements ({prefix}__placement, schedule id -> placement)
-- KEYS[3...]: lists taskiq-redis 1.2 writes ({prefix}:cron, {prefix}:interval,
--             {prefix}:time:YYYY-MM-DDTHH:MM), emptied into the index; may be none
-- ARGV[1]: the most members to return in this call (0: only empty 1.2's lists)
-- ARGV[2]: the most ids to take from 1.2's lists in this call
-- ARGV[3]: r, the number of lexicographic ranges to read, in order
-- ARGV[4 .. 3+2r]: each range's min and max, as ZRANGE BYLEX takes them
-- ARGV[4+2r]: the range to resume in (1-based)
-- ARGV[5+2r]: where to resume in it: "" for the range's min, else "(" .. the last member read
-- ARGV[6+2r ...]: the placement of the ids of each list in KEYS[3...], in the same order
-- returns: {range to resume in (0 when all were read), where to resume, {members},
--           {ids taken from 1.2's lists}}

local page, budget, ranges = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local at, from = tonumber(ARGV[4 + 2 * ranges]), ARGV[5 + 2 * ranges]
local taken = {}

if #KEYS > 2 and budget > 0 and redis.call('EXISTS', unpack(KEYS, 3)) > 0 then
    for k = 3, #KEYS do
        if budget <= 0 then
            break
        end
        local placement = ARGV[6 + 2 * ranges + k - 3]
        local ids = redis.call('LPOP', KEYS[k], budget)
        if ids then
            for _, id in ipairs(ids) do
                local old = redis.call('HGET', KEYS[2], id)
                if old ~= placement then
                    if old then
                        redis.call('ZREM', KEYS[1], old .. id)
                    end
                    redis.call('ZADD', KEYS[1], 0, placement .. id)
                    redis.call('HSET', KEYS[2], id, placement)
                end
                taken[#taken + 1] = id
            end
            budget = budget - #ids
        end
    end
end

local members = {}
local room = page
while at <= ranges and room > 0 do
    local low = from
    if low == '' then
        low = ARGV[2 + 2 * at]
    end
    local got = redis.call('ZRANGE', KEYS[1], low, ARGV[3 + 2 * at], 'BYLEX', 'LIMIT', 0, room)
    for _, member in ipairs(got) do
        members[#members + 1] = member
    end
    room = room - #got
    if room > 0 then
        at, from = at + 1, ''
    else
        from = '(' .. got[#got]
    end
end
if at > ranges then
    at = 0
end
return {at, from, members, taken}
