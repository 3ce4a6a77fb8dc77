-- name: dead_letter_requeue
-- version: 3
-- purpose: move a bounded batch of dead letters back to their queue in one atomic step: each
--          entry's original data is appended to the queue (XADD with field data on a stream,
--          LPUSH on a list) and the dead letter is deleted, so none is lost or run twice.
--          An entry whose stream field names one of the queue's priority level keys goes back
--          to that level, or to the highest level allowed when it came from above it; any
--          other to the queue itself. Entries without a data field cannot run again: they stay
--          and are counted as skipped. Either a range (oldest first) or given entry ids.
-- KEYS[1]: the queue's dead-letter stream ({queue}:dead)
-- KEYS[2]: the queue (a stream, a list, or no key yet: then the kind of its first level key
--          that exists, else a stream is created)
-- KEYS[3...]: the queue's priority level keys above 0, level 1 first (may be none)
-- ARGV[1]: where to start (an entry id; '-' for the oldest); an entry with exactly this id is
--          not examined again (it was skipped by the call that returned it). Unused with ids.
-- ARGV[2]: the most entries to examine, a whole number from 1 to 1000
-- ARGV[3]: the highest level to requeue onto, 0 to the number of level keys (absent: all of
--          them); an entry from a level key above it goes to this level
-- ARGV[4...]: entry ids to requeue, instead of a range (at most ARGV[2] of them)
-- returns: {entries requeued, entries skipped, id of the last entry examined ('' when none),
--          the ids given that are not in the dead-letter stream}

local count = tonumber(ARGV[2])
if not count or count < 1 or count > 1000 or count ~= math.floor(count) then
    return redis.error_reply('dead_letter_requeue: the batch size must be a whole number from 1 to 1000')
end
local top = #KEYS - 2
if ARGV[3] then
    top = tonumber(ARGV[3])
    if not top or top < 0 or top > #KEYS - 2 or top ~= math.floor(top) then
        return redis.error_reply('dead_letter_requeue: the highest level must be a whole number from 0 to ' .. (#KEYS - 2))
    end
end
if #ARGV - 3 > count then
    return redis.error_reply('dead_letter_requeue: more ids than the batch size')
end
local kind = redis.call('TYPE', KEYS[2])['ok']
for i = 3, #KEYS do
    if kind ~= 'none' then
        break
    end
    kind = redis.call('TYPE', KEYS[i])['ok']
end
local as_list = kind == 'list'
local level_of = {}
for i = 3, #KEYS do
    level_of[KEYS[i]] = i - 2
end

local entries, missing = {}, {}
if #ARGV > 3 then
    for i = 4, #ARGV do
        local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i], 'COUNT', 1)
        if #found == 1 then
            entries[#entries + 1] = found[1]
        else
            missing[#missing + 1] = ARGV[i]
        end
    end
else
    local start = ARGV[1]
    for _, entry in ipairs(redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', count + 1)) do
        if entry[1] ~= start and #entries < count then
            entries[#entries + 1] = entry
        end
    end
end

local requeued, skipped, last = 0, 0, ''
for _, entry in ipairs(entries) do
    local id, fields = entry[1], entry[2]
    last = id
    local data, level = nil, 0
    for i = 1, #fields, 2 do
        if fields[i] == 'data' then
            data = fields[i + 1]
        elseif fields[i] == 'stream' and level_of[fields[i + 1]] then
            level = level_of[fields[i + 1]]
        end
    end
    if data then
        local target = KEYS[2 + math.min(level, top)]
        local done
        if as_list then
            done = redis.pcall('LPUSH', target, data)
        else
            done = redis.pcall('XADD', target, '*', 'data', data)
        end
        if type(done) == 'table' and done['err'] then
            return redis.error_reply('dead_letter_requeue: ' .. target .. ': ' .. done['err'])
        end
        redis.call('XDEL', KEYS[1], id)
        requeued = requeued + 1
    else
        skipped = skipped + 1
    end
end
return {requeued, skipped, last, missing}
