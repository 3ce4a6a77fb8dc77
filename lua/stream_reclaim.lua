-- name: stream_reclaim
-- version: 2
-- purpose: claim for one live consumer the entries of its consumer group that stayed idle longer
--          than the idle timeout (their consumer died, its worker let them go, or it released
--          them on a clean stop), and say how often each was delivered. XAUTOCLAIM checks
--          idleness and claims in one atomic step, so no entry is ever claimed by two consumers
--          at once, and no lock key is needed. Entries deleted from the stream meanwhile are
--          dropped from the pending list by XAUTOCLAIM itself. Several XAUTOCLAIM calls per
--          script call sweep a long pending list quickly. Bounded: each XAUTOCLAIM scans at most
--          ten times the entries still wanted, and there are at most ARGV[6] of them.
-- KEYS[1]: the stream
-- ARGV[1]: the consumer group
-- ARGV[2]: the claiming consumer
-- ARGV[3]: the idle timeout in milliseconds
-- ARGV[4]: where to scan the pending entries from (an entry id; 0-0 starts over)
-- ARGV[5]: the most entries to claim
-- ARGV[6]: the most XAUTOCLAIM calls
-- returns: {next scan start (0-0 when the scan went round), {{id, delivery count, {field, value, ...}}, ...}}

local stream, group, consumer, idle = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local cursor, wanted = ARGV[4], tonumber(ARGV[5])
local entries = {}
for _ = 1, tonumber(ARGV[6]) do
    local claimed = redis.call(
        'XAUTOCLAIM', stream, group, consumer, idle, cursor, 'COUNT', wanted - #entries)
    cursor = claimed[1]
    for _, entry in ipairs(claimed[2]) do
        if entry and entry[2] then
            local pending = redis.call('XPENDING', stream, group, entry[1], entry[1], 1)
            local deliveries = pending[1] and pending[1][4] or 1
            entries[#entries + 1] = {entry[1], deliveries, entry[2]}
        end
    end
    if cursor == '0-0' or #entries >= wanted then
        break
    end
end
return {cursor, entries}
