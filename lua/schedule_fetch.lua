-- name: schedule_fetch
-- version: 1
-- purpose: one bounded page of the schedules a list schedule source must hand to the scheduler:
--          every cron and interval schedule id, then every timed schedule id whose bucket minute
--          has come (past minutes included), read in that order from a cursor so a large source
--          is read in several short calls.
-- KEYS[1]: the cron list ({prefix}:cron)
-- KEYS[2]: the interval list ({prefix}:interval)
-- KEYS[3]: the time index ({prefix}__time_index, schedule ids scored by bucket minute)
-- ARGV[1]: cursor part 1, where to resume: 1 cron list, 2 interval list, 3 time index
-- ARGV[2]: cursor part 2, the offset to resume at within that key
-- ARGV[3]: the most ids to return in this call
-- ARGV[4]: the current minute (unix seconds): timed schedules up to it are due
-- returns: {next key (0 when everything was read), next offset, {cron and interval ids},
--           {timed id, its minute, timed id, its minute, ...}}

local position, offset = tonumber(ARGV[1]), tonumber(ARGV[2])
local room = tonumber(ARGV[3])
local listed, timed = {}, {}

while position <= 3 and room > 0 do
    local count
    if position < 3 then
        local ids = redis.call('LRANGE', KEYS[position], offset, offset + room - 1)
        for _, id in ipairs(ids) do
            listed[#listed + 1] = id
        end
        count = #ids
    else
        local entries = redis.call('ZRANGE', KEYS[3], '-inf', ARGV[4], 'BYSCORE',
            'LIMIT', offset, room, 'WITHSCORES')
        for _, value in ipairs(entries) do
            timed[#timed + 1] = value
        end
        count = #entries / 2
    end
    room = room - count
    if room > 0 then
        position, offset = position + 1, 0
    else
        offset = offset + count
    end
end

if position > 3 then
    position = 0
end
return {position, offset, listed, timed}
