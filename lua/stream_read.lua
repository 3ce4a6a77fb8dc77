-- name: stream_read
-- version: 1
-- purpose: read new entries for one consumer of a group without blocking (XREADGROUP ... >), and
--          return them flat with only their data field, so a busy worker parses two values per
--          entry instead of six. An entry without a data field comes back with its whole
--          field/value list instead (the worker moves it to the dead-letter stream). A script
--          cannot block: on an empty answer the worker blocks natively in XREADGROUP. Bounded by
--          ARGV[3] entries per stream.
-- KEYS[1...]: the streams to read, all in one cluster slot
-- ARGV[1]: the consumer group
-- ARGV[2]: the reading consumer
-- ARGV[3]: the most entries to read from each stream (XREADGROUP COUNT)
-- returns: {stream, {id, data, id, data, ...}, ...} for each stream that had new entries; a data
--          that is an array is the field/value list of an entry without a data field

local read = {'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS'}
for i = 1, #KEYS do
    read[#read + 1] = KEYS[i]
end
for _ = 1, #KEYS do
    read[#read + 1] = '>'
end
local reply = redis.call(unpack(read))
local out = {}
if not reply then
    return out
end
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
    out[#out + 1] = stream[1]
    out[#out + 1] = flat
end
return out
