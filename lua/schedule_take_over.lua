-- name: schedule_take_over
-- version: 1
-- purpose: move schedule ids that taskiq-redis 1.2 pushed to its lists into a list schedule
--          source's index, a bounded number per call, so a 1.2 deployment switches without
--          losing schedules and a 1.2 process still adding schedules beside this package is
--          not ignored. An id already indexed elsewhere is moved to the list's placement
--          (1.2's add is the newer write). The lists are emptied as they are read.
-- KEYS[1]: the index ({prefix}__schedules, every score 0, members placement .. id: "c" cron,
--          "i" interval, "t" + YYYY-MM-DDTHH:MM timed)
-- KEYS[2]: the placements ({prefix}__placement, schedule id -> placement)
-- KEYS[3...]: 1.2's lists ({prefix}:cron, {prefix}:interval, {prefix}:time:YYYY-MM-DDTHH:MM)
-- ARGV[1]: the most ids to take in this call
-- ARGV[2...]: the placement of the ids of each list in KEYS[3...], in the same order
-- returns: the ids taken; fewer than ARGV[1] when the lists are empty now

local budget = tonumber(ARGV[1])
local taken = {}
for k = 3, #KEYS do
    if budget <= 0 then
        break
    end
    local placement = ARGV[k - 1]
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
return taken
