-- name: schedule_key_write
-- version: 1
-- purpose: store or delete one schedule of a key-based schedule source together with its entry
--          in the source's index, so get_schedules reads the index instead of scanning the
--          keyspace and never sees one without the other.
-- KEYS[1]: the schedule's data key ({prefix}:{schedule_id}, the taskiq-redis 1.2 name)
-- KEYS[2]: the source's index ({prefix}__index, a sorted set of schedule ids, all scored 0)
-- ARGV[1]: the schedule id
-- ARGV[2]: "set" to store, "delete" to remove, "prune" to remove the index entry only if the
--          data key is missing
-- ARGV[3]: the serialized schedule for "set", else ignored
-- returns: nil

local id, action = ARGV[1], ARGV[2]
if action == 'set' then
    redis.call('SET', KEYS[1], ARGV[3])
    redis.call('ZADD', KEYS[2], 0, id)
elseif action == 'delete' then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], id)
elseif action == 'prune' then
    if redis.call('EXISTS', KEYS[1]) == 0 then
        redis.call('ZREM', KEYS[2], id)
    end
else
    return redis.error_reply('schedule_key_write: unknown action ' .. action)
end
return false
