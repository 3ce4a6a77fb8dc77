-- name: dead_letter_purge
-- version: 1
-- purpose: delete a bounded batch of the oldest dead letters, up to a given entry id, so a purge
--          removes what was there when it began and never a dead letter that arrived since.
-- KEYS[1]: the queue's dead-letter stream ({queue}:dead)
-- ARGV[1]: the id of the newest entry to delete
-- ARGV[2]: the most entries to delete, a whole number from 1 to 1000
-- returns: the number of entries deleted (fewer than ARGV[2]: nothing up to ARGV[1] is left)

local count = tonumber(ARGV[2])
if not count or count < 1 or count > 1000 or count ~= math.floor(count) then
    return redis.error_reply('dead_letter_purge: the batch size must be a whole number from 1 to 1000')
end
local entries = redis.call('XRANGE', KEYS[1], '-', ARGV[1], 'COUNT', count)
if #entries == 0 then
    return 0
end
local ids = {}
for i, entry in ipairs(entries) do
    ids[i] = entry[1]
end
return redis.call('XDEL', KEYS[1], unpack(ids))
