-- name: delay_move
-- version: 2
-- purpose: move the delayed messages that are due (by the server's clock) from a queue's delayed
--          set to the queue, oldest due first, in one atomic step: however many workers run it at
--          once, each message is moved exactly once. Bounded by ARGV[2] messages per call.
-- KEYS[1]: the queue's delayed set ({queue}:delayed)
-- KEYS[2...]: the queue's keys by priority level: KEYS[2] is level 0 (the queue itself),
--             KEYS[3] level 1, ...; a member whose level has no key goes to the last key given
-- ARGV[1]: 'stream' (XADD with field data) or 'list' (LPUSH)
-- ARGV[2]: the most messages to move, a whole number from 1 to 1000
-- ARGV[3]: for streams, the MAXLEN to trim to (0: no trimming)
-- ARGV[4]: for streams, '1' to trim approximately (MAXLEN ~), '0' exactly
-- returns: {messages moved, milliseconds until the next message is due (-1: none is left)}

local kind, count = ARGV[1], tonumber(ARGV[2])
if kind ~= 'stream' and kind ~= 'list' then
    return redis.error_reply('delay_move: the queue kind must be stream or list')
end
if not count or count < 1 or count > 1000 or count ~= math.floor(count) then
    return redis.error_reply('delay_move: the batch size must be a whole number from 1 to 1000')
end
local trim = {}
local maxlen = tonumber(ARGV[3]) or 0
if maxlen > 0 then
    trim = ARGV[4] == '1' and {'MAXLEN', '~', maxlen} or {'MAXLEN', maxlen}
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, count)
local indexed = redis.call('EXISTS', KEYS[2]) == 1
for _, member in ipairs(due) do
    local head, hex, level = string.match(member, '^((%x+):(%d+):)')
    local message = member
    local target_index = 3
    if head then
        message = string.sub(member, #head + 1)
        target_index = math.min(tonumber(level) + 3, #KEYS)
    end
    local target = KEYS[target_index]
    local task_id = nil
    if indexed and head and #hex % 2 == 0 then
        -- a unique message's head is the hex of its task id (a plain one's is random)
        local id = string.gsub(hex, '..', function(pair) return string.char(tonumber(pair, 16)) end)
        if redis.call('HGET', KEYS[2], id) == 'd:' .. member then
            task_id = id
        end
    end
    if kind == 'stream' then
        local args = {target}
        for _, word in ipairs(trim) do
            args[#args + 1] = word
        end
        args[#args + 1] = '*'
        args[#args + 1] = 'data'
        args[#args + 1] = message
        local id = redis.call('XADD', unpack(args))
        if task_id then
            redis.call('HSET', KEYS[2], task_id, 's:' .. (target_index - 3) .. ':' .. id)
        end
    else
        redis.call('LPUSH', target, message)
        if task_id then
            redis.call('HSET', KEYS[2], task_id, 'l:' .. (target_index - 3) .. ':' .. message)
        end
    end
    redis.call('ZREM', KEYS[1], member)
end

local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if next_due[2] then
    wait = math.max(0, tonumber(next_due[2]) - now)
end
return {#due, wait}
