-- name: stream_read
-- version: 2
-- purpose: read new entries for one consumer of a group without blocking (XREADGROUP ... >), and
--          return them flat with only their data field, so a busy worker parses two values per
--          entry instead of six. An entry without a data field comes back with its whole
--          field/value list instead (the worker moves it to the dead-letter stream). A script
--          cannot block: on an empty answer the worker blocks natively in XREADGROUP. Bounded by
--          ARGV[3] entries per stream. The streams come in tiers, highest priority level first:
--          a tier is read only when every tier before it had nothing new, so a priority level is
--          read only while every higher one is empty.
-- KEYS[1...]: the streams to read, all in one cluster slot, tier after tier
-- ARGV[1]: the consumer group
-- ARGV[2]: the reading consumer
-- ARGV[3]: the most entries to read from each stream (XREADGROUP COUNT)
-- ARGV[4...]: how many of KEYS each tier has, in order, adding up to the number of KEYS; none
--             given: one tier of every key
-- returns: {stream, {id, data, id, data, ...}, ...} for each stream of the first tier that had
--          new entries; a data that is an array is the field/value list of an entry without a
--          data field; an empty array when no stream had new entries

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

local out = {}
local first = 1
for _, size in ipairs(tiers) do
    local read = {'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS'}
    for i = first, first + size - 1 do
        read[#read + 1] = KEYS[i]
    end
    for _ = 1, size do
        read[#read + 1] = '>'
    end
    first = first + size
    local reply = redis.call(unpack(read))
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
        if #out > 0 then
            return out
        end
    end
end
return out
