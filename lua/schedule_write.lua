-- name: schedule_write
-- version: 2
-- purpose: store, replace or delete one schedule of a list schedule source together with its
--          entry in the source's index, touching only that schedule's own entries (one member
--          of a sorted set and one hash field), so a write costs the same at 10 or 100k
--          schedules and a reader never sees a schedule in two places. Optionally removes the
--          schedule from a key-based source in the same step (migration inside one slot).
-- KEYS[1]: the schedule's data key ({prefix}:data:{schedule_id}, taskiq-redis 1.2's name)
-- KEYS[2]: the index ({prefix}__schedules): a sorted set, every score 0, one member per
--          schedule: its placement followed by its id ("c" cron, "i" interval,
--          "t" + YYYY-MM-DDTHH:MM for a timed schedule of that UTC minute)
-- KEYS[3...]: the placements ({prefix}__placement): a hash, schedule id -> placement; then,
--             only when moving a schedule out of a key-based source, that source's data key
--             and its index
-- ARGV[1]: the schedule id
-- ARGV[2]: "store" to store the schedule (replacing what was stored under this id),
--          "delete" to remove it, "sent" to remove it only while it still has the placement
--          ARGV[3] (a one-off schedule that was just sent and not moved meanwhile), "prune"
--          to remove its index entry only if its data key is missing, "move" to give it the
--          placement ARGV[3] only while it still has the placement ARGV[4] (its data, written
--          by someone else, says it belongs elsewhere)
-- ARGV[3]: the placement for "store", "sent" and "move", else ignored
-- ARGV[4]: the serialized schedule for "store", the placement expected now for "move", else
--          ignored
-- returns: 1 when the schedule was stored, moved or removed, 0 when "sent", "prune" or "move"
--          left it alone

local id, action, placement = ARGV[1], ARGV[2], ARGV[3]
local known = {store = true, delete = true, sent = true, prune = true, move = true}
if not known[action] then
    return redis.error_reply('schedule_write: unknown action ' .. action)
end
if #KEYS ~= 3 and #KEYS ~= 5 then
    return redis.error_reply('schedule_write: expected 3 or 5 keys, got ' .. #KEYS)
end

local old = redis.call('HGET', KEYS[3], id)
if action == 'sent' and old ~= placement then
    return 0
end
if action == 'prune' and redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
end
if action == 'move' and (old ~= ARGV[4] or redis.call('EXISTS', KEYS[1]) == 0) then
    return 0
end

if action == 'store' or action == 'move' then
    if old ~= placement then
        if old then
            redis.call('ZREM', KEYS[2], old .. id)
        end
        redis.call('ZADD', KEYS[2], 0, placement .. id)
        redis.call('HSET', KEYS[3], id, placement)
    end
    if action == 'store' then
        redis.call('SET', KEYS[1], ARGV[4])
    end
else
    if old then
        redis.call('ZREM', KEYS[2], old .. id)
        redis.call('HDEL', KEYS[3], id)
    end
    if action ~= 'prune' then
        redis.call('DEL', KEYS[1])
    end
end

if #KEYS == 5 then
    redis.call('DEL', KEYS[4])
    redis.call('ZREM', KEYS[5], id)
end
return 1
