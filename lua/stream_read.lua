-- name: stream_read
-- version: 3
-- purpose: read new entries for one consumer of a group without blocking (XREADGROUP ... >), and
--          return them flat with only their data field, so a busy worker parses two values per
--          entry instead of six. An entry without a data field comes back with its whole
--          field/value list instead (the worker moves it to the dead-letter stream). A script
--          cannot block: on an empty answer the worker blocks natively in XREADGROUP. Bounded by
--          ARGV[3] entries per stream. The streams come in tiers, highest priority level first:
--          a tier is read only when every tier before it had nothing new, so a priority level is
--          read only while every higher one is empty. A stream that does not exist is skipped
--          (a priority level's stream is made by its first message), and one that exists
--          without the group gets it, from its start, so no message kicked to a new level, moved
--          there by the delay mover or requeued there is skipped. So the reply also says which
--          streams exist, and where the group was made: a worker names only those in its
--          blocking reads.
-- KEYS[1...]: the streams to read, all in one cluster slot, tier after tier
-- ARGV[1]: the consumer group
-- ARGV[2]: the reading consumer
-- ARGV[3]: the most entries to read from each stream (XREADGROUP COUNT)
-- ARGV[4...]: how many of KEYS each tier has, in order, adding up to the number of KEYS; none
--             given: one tier of every key
-- returns: {{the KEYS that exist}, {the KEYS whose group this call created}, stream,
--          {id, data, id, data, ...}, ...} with a stream and its entries for each stream of the
--          first tier that had new entries; a data that is an array is the field/value list of
--          an entry without a data field

local tiers = {}
for i = 4, #ARGV do
    tiers[#tiers + 1] = tonumber(ARGV[i])
end
if #tiers == 0 then
    tiers[1] = #KEYS
end
local total = 0
for _, size in ipairs(tiers) do
    if not size or size < 1 or size ~= math.floor(size) then
        return redis.error_reply('stream_read: a tier size must be a whole number of at least 1')
    end
    total = total + size
end
if total ~= #KEYS then
    return redis.error_reply('stream_read: the tier sizes must add up to the number of keys')
end

local group, consumer, count = ARGV[1], ARGV[2], ARGV[3]
local existing, created = {}, {}
local exists = {}
for i, stream in ipairs(KEYS) do
    exists[i] = redis.call('EXISTS', stream) == 1
    if exists[i] then
        existing[#existing + 1] = stream
    end
end

local function read(streams)
    local command = {'XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS'}
    for _, stream in ipairs(streams) do
        command[#command + 1] = stream
    end
    for _ = 1, #streams do
        command[#command + 1] = '>'
    end
    return redis.pcall(unpack(command))
end

local out = {existing, created}
local first = 1
for _, size in ipairs(tiers) do
    local streams = {}
    for i = first, first + size - 1 do
        if exists[i] then
            streams[#streams + 1] = KEYS[i]
        end
    end
    first = first + size
    if #streams > 0 then
        local reply = read(streams)
        if type(reply) == 'table' and reply.err then
            if not string.find(reply.err, 'NOGROUP', 1, true) then
                return reply
            end
            for _, stream in ipairs(streams) do
                local made = redis.pcall('XGROUP', 'CREATE', stream, group, '0')
                if type(made) == 'table' and made.err then
                    if not string.find(made.err, 'BUSYGROUP', 1, true) then
                        return made
                    end
                else
                    created[#created + 1] = stream
                end
            end
            reply = read(streams)
            if type(reply) == 'table' and reply.err then
                return reply
            end
        end
        if reply then
            for _, stream in ipairs(reply) do
                local flat = {}
                for _, entry in ipairs(stream[2]) do
                    local fields, data = entry[2], nil
                    for i = 1, #fields, 2 do
                        if fields[i] == 'data' then
                            data = fields[i + 1]
                            break
                        end
                    end
                    flat[#flat + 1] = entry[1]
                    flat[#flat + 1] = data or fields
                end
                if #flat > 0 then
                    out[#out + 1] = stream[1]
                    out[#out + 1] = flat
                end
            end
            if #out > 2 then
                return out
            end
        end
    end
end
return out
