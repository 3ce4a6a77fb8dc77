-- name: dead_letter_requeue
-- version: 2
-- purpose: move a bounded batch of dead letters back to their queue in one atomic step: each
--          entry's original data is appended to the queue (XADD with field data on a stream,
--          LPUSH on a list) and the dead letter is deleted, so none is lost or run twice.
--          An entry whose stream field names one of the queue's priority level keys goes back
--          to that level; any other to the queue itself. Entries without a data field cannot
--          run again: they stay and are counted as skipped.
-- KEYS[1]: the queue's dead-letter stream ({queue}:dead)
-- KEYS[2]: the queue (a stream, a list, or no key yet: then a stream is created)
-- KEYS[3...]: the queue's priority level keys above 0 (may be none)
-- ARGV[1]: where to start (an entry id; '-' for the oldest); an entry with exactly this id is
--          not examined again (it was skipped by the call that returned it)
-- ARGV[2]: the most entries to examine, a whole number from 1 to 1000
-- returns: {entries requeued, entries skipped, id of the last entry examined ('' when none)}

local count = tonumber(ARGV[2])
if not count or count < 1 or count > 1000 or count ~= math.floor(count) then
    return redis.error_reply('dead_letter_requeue: the batch size must be a whole number from 1 to 1000')
end
local as_list = redis.call('TYPE', KEYS[2])['ok'] == 'list'
local levels = {}
for i = 3, #KEYS do
    levels[KEYS[i]] = true
end
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', count + 1)
local requeued, skipped, last = 0, 0, ''
local examined = 0
for _, entry in ipairs(entries) do
    local id, fields = entry[1], entry[2]
    if id ~= ARGV[1] and examined < count then
        examined = examined + 1
        last = id
        local data, target = nil, KEYS[2]
        for i = 1, #fields, 2 do
            if fields[i] == 'data' then
                data = fields[i + 1]
            elseif fields[i] == 'stream' and levels[fields[i + 1]] then
                target = fields[i + 1]
            end
        end
        if data then
            if as_list then
                redis.call('LPUSH', target, data)
            else
                redis.call('XADD', target, '*', 'data', data)
            end
            redis.call('XDEL', KEYS[1], id)
            requeued = requeued + 1
        else
            skipped = skipped + 1
        end
    end
end
return {requeued, skipped, last}
