-- name: stream_renew
-- version: 1
-- purpose: set the idle time of stream entries that this consumer still owns: 0 renews its claim
--          while it works on them, so no reclaim takes them from a live consumer; a huge value
--          releases them to the next reclaim by any consumer (on a clean stop). An entry that
--          another consumer reclaimed meanwhile, or that was acknowledged, is never taken back.
--          Bounded by the number of ids passed.
-- KEYS[1]: the stream
-- ARGV[1]: the consumer group
-- ARGV[2]: this consumer
-- ARGV[3]: the idle time to set, in milliseconds
-- ARGV[4...]: pairs of an entry id and the delivery count to set ('' keeps the count)
-- returns: the ids of the entries this consumer no longer owns

local stream, group, consumer, idle = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local lost = {}
for i = 4, #ARGV, 2 do
    local id, deliveries = ARGV[i], ARGV[i + 1]
    local pending = redis.call('XPENDING', stream, group, id, id, 1)
    local owned = pending[1] and pending[1][2] == consumer
    if owned then
        local claim = {'XCLAIM', stream, group, consumer, 0, id, 'IDLE', idle, 'JUSTID'}
        if deliveries ~= '' then
            claim[#claim + 1] = 'RETRYCOUNT'
            claim[#claim + 1] = deliveries
        end
        owned = #redis.call(unpack(claim)) > 0
    end
    if not owned then
        lost[#lost + 1] = id
    end
end
return lost
