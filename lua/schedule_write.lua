-- name: schedule_write
-- version: 1
-- purpose: store, replace or delete one schedule of a list schedule source together with its
--          index entries (cron list, interval list, time bucket list and time index), so no
--          reader ever sees a schedule without its entry or an entry in two places. The time
--          bucket lists are named by the caller: when the schedule sits in a bucket the caller
--          did not pass, nothing is changed and that bucket's minute is returned, and the caller
--          calls again with it. Optionally removes the schedule from a key-based source in the
--          same step (migration inside one slot).
-- KEYS[1]: the schedule's data key ({prefix}:data:{schedule_id})
-- KEYS[2]: the cron list ({prefix}:cron)
-- KEYS[3]: the interval list ({prefix}:interval)
-- KEYS[4...]: the time index ({prefix}__time_index, a sorted set of schedule ids scored by their
--             bucket minute), then one time bucket list ({prefix}:time:{minute}) per minute in
--             ARGV[6...], in the same order, then, only when moving a schedule out of a
--             key-based source, that source's data key and its index
-- ARGV[1]: the schedule id
-- ARGV[2]: "cron", "interval" or "time" to store the schedule as that kind (replacing what was
--          stored under this id), "delete" to remove it, "prune" to remove its entries only if
--          its data key is missing
-- ARGV[3]: the serialized schedule when storing, else ignored
-- ARGV[4]: the bucket minute (unix seconds) of a "time" schedule, one of ARGV[6...]; else ""
-- ARGV[5]: n, the number of time bucket lists given in KEYS[5..4+n]
-- ARGV[6...]: the n bucket minutes (unix seconds) of those lists
-- returns: nil when done (or, for "prune", when the data exists and nothing was removed); the
--          minute of the schedule's current time bucket when that bucket was not given, in which
--          case nothing was changed

local id, action = ARGV[1], ARGV[2]
local given = tonumber(ARGV[5])
local buckets = {}
for i = 1, given do
    buckets[tonumber(ARGV[5 + i])] = KEYS[4 + i]
end
local storing = action == 'cron' or action == 'interval' or action == 'time'
if not storing and action ~= 'delete' and action ~= 'prune' then
    return redis.error_reply('schedule_write: unknown action ' .. action)
end
if #KEYS ~= 4 + given and #KEYS ~= 6 + given then
    return redis.error_reply('schedule_write: expected ' .. (4 + given) .. ' or ' .. (6 + given)
        .. ' keys, got ' .. #KEYS)
end
if action == 'time' and not buckets[tonumber(ARGV[4])] then
    return redis.error_reply('schedule_write: the bucket of minute ' .. ARGV[4] .. ' is not given')
end

if action == 'prune' and redis.call('EXISTS', KEYS[1]) == 1 then
    return false
end

local old = redis.call('ZSCORE', KEYS[4], id)
if old and not buckets[tonumber(old)] then
    return old
end

redis.call('LREM', KEYS[2], 0, id)
redis.call('LREM', KEYS[3], 0, id)
if old then
    redis.call('LREM', buckets[tonumber(old)], 0, id)
    redis.call('ZREM', KEYS[4], id)
end

if not storing then
    redis.call('DEL', KEYS[1])
else
    redis.call('SET', KEYS[1], ARGV[3])
    if action == 'cron' then
        redis.call('RPUSH', KEYS[2], id)
    elseif action == 'interval' then
        redis.call('RPUSH', KEYS[3], id)
    else
        redis.call('RPUSH', buckets[tonumber(ARGV[4])], id)
        redis.call('ZADD', KEYS[4], ARGV[4], id)
    end
end

if #KEYS == 4 + given + 2 then
    redis.call('DEL', KEYS[5 + given])
    redis.call('ZREM', KEYS[6 + given], id)
end
return false
