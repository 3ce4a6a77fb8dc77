-- name: task_add
-- version: 1
-- purpose: queue or delay a message and record where it went in the queue's task index, so
--          cancel finds it at once however long the queue. For a unique kick (ARGV[10] '1'),
--          only unless a message of the same task id is already queued, delayed, or (stream)
--          held by a worker and not yet acknowledged: the check and the enqueue are one atomic
--          step, so any number of kicks of one id at once leave exactly one message. A record
--          whose message is gone (acknowledged, dead-lettered, cancelled, purged, trimmed,
--          popped from a list) is stale and frees its id. An index with well over twice as many
--          records as the queue has messages is swept: four random records, deleted if stale,
--          so it does not grow with ids never kicked again. Bounded: one lookup (an LPOS over a
--          list queue's level for a list message), four for a sweep.
-- KEYS[1]: the queue's task index ({queue}:unique, a hash: task id -> where its message is:
--          'd:<delayed member>', 's:<level>:<entry id>' or 'l:<level>:<message>')
-- KEYS[2]: the queue's delayed set ({queue}:delayed)
-- KEYS[3...]: the queue's keys by priority level: KEYS[3] is level 0 (the queue itself), ...
-- ARGV[1]: 'stream' or 'list'
-- ARGV[2]: the task id
-- ARGV[3]: the priority level (a KEYS index from 0)
-- ARGV[4]: the delay in milliseconds (0: due now)
-- ARGV[5]: the message
-- ARGV[6]: for a delayed message, its member head ("<hex of the task id>:<level>:")
-- ARGV[7]: for a stream, the consumer group a new level stream is created with
-- ARGV[8]: for a stream, the MAXLEN to trim to ('' for none)
-- ARGV[9]: for a stream, '~' to trim approximately, '=' exactly
-- ARGV[10]: '1' for a unique kick (dropped if its id's message is there), '0' to only record
-- returns: 1 when the message was queued or delayed, 0 when it was dropped as a duplicate

local index, delayed = KEYS[1], KEYS[2]
local SWEEP_FLOOR = 64
local kind, task_id, level = ARGV[1], ARGV[2], tonumber(ARGV[3])
local delay, message = tonumber(ARGV[4]), ARGV[5]
if kind ~= 'stream' and kind ~= 'list' then
    return redis.error_reply('task_add: the queue kind must be stream or list')
end
local target = KEYS[level + 3]
if not target then
    return redis.error_reply('task_add: no key given for priority level ' .. ARGV[3])
end

local function present(where)
    if not where then
        return false
    end
    local place, rest = string.sub(where, 1, 1), string.sub(where, 3)
    if place == 'd' then
        return redis.call('ZSCORE', delayed, rest) ~= false
    end
    local cut = string.find(rest, ':', 1, true)
    if not cut then
        return false
    end
    local key = KEYS[tonumber(string.sub(rest, 1, cut - 1)) + 3]
    local what = string.sub(rest, cut + 1)
    if not key then
        return false
    end
    if place == 's' then
        return #redis.call('XRANGE', key, what, what) > 0
    end
    return redis.call('LPOS', key, what) ~= false
end

-- The sweep: only an index holding well over twice the messages the queue holds (so most of
-- its records are stale) looks at four random records and deletes the stale ones; that removes
-- more than the one record a kick adds, so the index stays within about twice the queue.
local records = redis.call('HLEN', index)
if records > SWEEP_FLOOR then
    local messages = redis.call('ZCARD', delayed)
    for i = 3, #KEYS do
        messages = messages + redis.call(kind == 'stream' and 'XLEN' or 'LLEN', KEYS[i])
    end
    if records > 2 * messages + SWEEP_FLOOR then
        local sample = redis.call('HRANDFIELD', index, 4, 'WITHVALUES')
        for i = 1, #sample, 2 do
            if sample[i] ~= task_id and not present(sample[i + 1]) then
                redis.call('HDEL', index, sample[i])
            end
        end
    end
end

if ARGV[10] == '1' and present(redis.call('HGET', index, task_id)) then
    return 0
end

local where
if delay > 0 then
    local clock = redis.call('TIME')
    local due = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + delay
    local member = ARGV[6] .. message
    redis.call('ZADD', delayed, due, member)
    where = 'd:' .. member
elseif kind == 'stream' then
    if level > 0 and redis.call('EXISTS', target) == 0 then
        redis.call('XGROUP', 'CREATE', target, ARGV[7], '0', 'MKSTREAM')
    end
    local id
    if ARGV[8] ~= '' then
        id = redis.call('XADD', target, 'MAXLEN', ARGV[9], ARGV[8], '*', 'data', message)
    else
        id = redis.call('XADD', target, '*', 'data', message)
    end
    where = 's:' .. level .. ':' .. id
else
    redis.call('LPUSH', target, message)
    where = 'l:' .. level .. ':' .. message
end
redis.call('HSET', index, task_id, where)
return 1
