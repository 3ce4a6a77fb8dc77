-- name: task_cancel
-- version: 2
-- purpose: take back a task that no worker has taken yet: find its message in the queue's delayed
--          set or at any priority level and delete it, so it never runs. A message kicked unique or
--          cancellable is found at once through the queue's task index; any other is looked for, a
--          bounded slice per call, in the delayed set (newest due first) and then in each level (a
--          stream's after what the group was handed), by its task id as taskiq's JSON writes it
--          ('"task_id":"<id>"' or '"task_id": "<id>"'). Finding and deleting are one atomic step: a
--          stream entry already delivered to a consumer of the group (held by a worker, or done) is
--          never deleted, and a worker reading at the same moment either got it first or never
--          will. Bounded: at most ARGV[7] messages looked at per call; the caller calls again from
--          where the last call stopped.
-- KEYS[1]: the queue's task index ({queue}:unique)
-- KEYS[2]: the queue's delayed set ({queue}:delayed)
-- KEYS[3...]: the queue's keys by priority level: KEYS[3] is level 0 (the queue itself), ...
-- ARGV[1]: 'stream' or 'list'
-- ARGV[2]: the task id
-- ARGV[3]: the task id as a JSON string, quotes included ("<id>")
-- ARGV[4]: for a stream, the consumer group whose delivery decides "taken"
-- ARGV[5]: the phase to go on with: 0 the index, 1 the delayed set, 2 + n level n
-- ARGV[6]: where in that phase ('' from its start)
-- ARGV[7]: the most messages to look at in this call
-- ARGV[8]: a mark no message holds (a random token), put where a list message is removed
-- ARGV[9]: the task id as a JSON string written another way (non-ASCII kept, not escaped), or ''
-- returns: {outcome, phase, position}: outcome 'cancelled' (deleted), 'taken' (a worker holds
--          it or ran it), 'more' (not found yet: call again with phase and position) or 'none'

local index, delayed = KEYS[1], KEYS[2]
local kind, task_id, group = ARGV[1], ARGV[2], ARGV[4]
local quoted = {ARGV[3]}
if ARGV[9] and ARGV[9] ~= '' and ARGV[9] ~= ARGV[3] then
    quoted[2] = ARGV[9]
end
local phase, position, budget = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local levels = #KEYS - 2

local find, first, second = string.find, quoted[1], quoted[2]

-- Whether a message may be this task's: it holds the quoted id. One plain search a message (two
-- for a non-ASCII id), inline where messages are looked at: a call per message would cost more.
-- holds(data) then tells the rare hit elsewhere (an argument) apart.

-- Whether a message is this task's: the quoted id right after "task_id": (taskiq's JSON, with
-- or without a space after the colon, as its formatters write it).
local function holds(data)
    for _, form in ipairs(quoted) do
        local from = 1
        while true do
            local at = string.find(data, form, from, true)
            if not at then
                break
            end
            if string.find(string.sub(data, math.max(1, at - 12), at - 1), '"task_id":%s?$') then
                return true
            end
            from = at + 1
        end
    end
    return false
end

local function id_parts(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms), tonumber(seq)
end

local function after(a, b) -- whether stream id a comes after stream id b
    local a_ms, a_seq = id_parts(a)
    local b_ms, b_seq = id_parts(b)
    return a_ms > b_ms or (a_ms == b_ms and a_seq > b_seq)
end

local function delivered_up_to(key) -- the group's last delivered id on a stream
    local found = redis.pcall('XINFO', 'GROUPS', key)
    if type(found) ~= 'table' or found.err then
        return nil
    end
    for _, about in ipairs(found) do
        local name, last = nil, nil
        for i = 1, #about, 2 do
            if about[i] == 'name' then
                name = about[i + 1]
            elseif about[i] == 'last-delivered-id' then
                last = about[i + 1]
            end
        end
        if name == group then
            return last
        end
    end
    return nil
end

-- A stream entry of this task: deleted unless the group has delivered it.
local function take_entry(key, id)
    local last = delivered_up_to(key)
    if last and not after(id, last) then
        return 'taken'
    end
    redis.call('XDEL', key, id)
    redis.call('HDEL', index, task_id)
    return 'cancelled'
end

-- A stream slice: the outcome for this task's entry in it ('cancelled' or 'taken'), or nil.
local function look_through(key, entries)
    for _, entry in ipairs(entries) do
        local fields = entry[2]
        -- taskiq's entries have the one field; the id can only be in its value
        local data = fields[1] == 'data' and fields[2] or nil
        if not data then
            for i = 1, #fields, 2 do
                if fields[i] == 'data' then
                    data = fields[i + 1]
                end
            end
        end
        if data and (find(data, first, 1, true) or (second and find(data, second, 1, true)))
            and holds(data) then
            local outcome = take_entry(key, entry[1])
            if outcome == 'cancelled' then
                return outcome
            end
            -- delivered: held by a worker unless acknowledged and kept as a log
            local pending = redis.call('XPENDING', key, group, entry[1], entry[1], 1)
            if #pending > 0 then
                return 'taken'
            end
        end
    end
    return nil
end

if phase == 0 then
    local where = redis.call('HGET', index, task_id)
    if where then
        local place, rest = string.sub(where, 1, 1), string.sub(where, 3)
        if place == 'd' then
            if redis.call('ZREM', delayed, rest) == 1 then
                redis.call('HDEL', index, task_id)
                return {'cancelled', 0, ''}
            end
        else
            local cut = string.find(rest, ':', 1, true)
            local key = cut and KEYS[tonumber(string.sub(rest, 1, cut - 1)) + 3]
            local what = cut and string.sub(rest, cut + 1)
            if key and place == 's' and #redis.call('XRANGE', key, what, what) > 0 then
                return {take_entry(key, what), 0, ''}
            end
            if key and place == 'l' and redis.call('LREM', key, 1, what) == 1 then
                redis.call('HDEL', index, task_id)
                return {'cancelled', 0, ''}
            end
        end
        redis.call('HDEL', index, task_id) -- stale: its message is gone
    end
    phase, position = 1, ''
end

while phase <= levels + 1 and budget > 0 do
    if phase == 1 then
        -- newest due first: the mover takes the oldest, so positions from the end hold still
        local start = tonumber(position) or 0
        local members = redis.call('ZREVRANGE', delayed, start, start + budget - 1)
        for _, member in ipairs(members) do
            if (find(member, first, 1, true) or (second and find(member, second, 1, true)))
                and holds(member) then
                redis.call('ZREM', delayed, member)
                redis.call('HDEL', index, task_id)
                return {'cancelled', 0, ''}
            end
        end
        budget = budget - #members
        if #members == 0 or budget > 0 then
            phase, position = 2, ''
        else
            position = tostring(start + #members)
        end
    else
        local key = KEYS[phase + 1]
        if kind == 'stream' then
            -- from both ends at once, half a slice each, until they meet: a task is found
            -- within half a scan of either end (new entries are added at the top, above where
            -- the look from the top began: a task kicked after the look began is not its)
            local low, high = string.match(position, '^(.-)|(.*)$')
            low, high = low or '', high or ''
            if position == '' then
                -- what the group was handed is never deleted: the look starts after it
                low = delivered_up_to(key) or ''
            end
            local half = math.max(1, math.floor(budget / 2))
            local top = high == '' and '+' or ('(' .. high)
            local up = redis.call('XRANGE', key, low == '' and '-' or ('(' .. low), top, 'COUNT', half)
            local outcome = look_through(key, up)
            if outcome then
                return {outcome, 0, ''}
            end
            if #up > 0 then
                low = up[#up][1]
            end
            local down = {}
            if #up == half then
                down = redis.call('XREVRANGE', key, top, '(' .. low, 'COUNT', half)
                outcome = look_through(key, down)
                if outcome then
                    return {outcome, 0, ''}
                end
                if #down > 0 then
                    high = down[#down][1]
                end
            end
            budget = budget - #up - #down
            if #up < half or #down < half then -- the two looks met: this level is done
                phase, position = phase + 1, ''
            else
                position = low .. '|' .. high
            end
        else
            -- from the head: pushes there move positions up (looked at twice, harmless), pops
            -- at the tail move nothing looked at yet
            local start = tonumber(position) or 0
            local messages = redis.call('LRANGE', key, start, start + budget - 1)
            for offset, message in ipairs(messages) do
                if (find(message, first, 1, true) or (second and find(message, second, 1, true)))
                    and holds(message) then
                    -- removed where it is: marked, then the mark removed from the nearer end
                    -- (an LREM of the message itself would walk the list from the head)
                    local at = start + offset - 1
                    redis.call('LSET', key, at, ARGV[8])
                    local near = at < redis.call('LLEN', key) / 2 and 1 or -1
                    redis.call('LREM', key, near, ARGV[8])
                    redis.call('HDEL', index, task_id)
                    return {'cancelled', 0, ''}
                end
            end
            budget = budget - #messages
            if #messages == 0 or budget > 0 then
                phase, position = phase + 1, ''
            else
                position = tostring(start + #messages)
            end
        end
    end
end
if phase > levels + 1 then
    return {'none', phase, ''}
end
return {'more', phase, position}
