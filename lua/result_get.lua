-- name: result_get
-- version: 1
-- purpose: read a task's result; with delete set, remove the result and its progress in the
--          same atomic step, so a result meant to be read once is handed to one reader only.
-- KEYS[1]: the result key (task_id, or prefix_str:task_id)
-- KEYS[2]: the progress key of the same task, in the same slot ({result key}__progress)
-- ARGV[1]: "1" to delete the result and its progress after reading, "0" to keep them
-- returns: the stored result (bulk string), or nil when there is none

local value = redis.call('GET', KEYS[1])
if value and ARGV[1] == '1' then
    redis.call('DEL', KEYS[1], KEYS[2])
end
return value
