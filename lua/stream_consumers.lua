-- name: stream_consumers
-- version: 1
-- purpose: remove consumers of a group that hold nothing, so worker restarts do not pile up
--          consumers: the calling consumer itself when it stops cleanly and holds nothing, and
--          any consumer that holds nothing and has been idle longer than a bound far above the
--          idle timeout (a worker that died, or stopped while it still held entries that others
--          have since reclaimed). A consumer that holds an entry is never removed: XGROUP
--          DELCONSUMER would drop its pending entries, which nobody could then reclaim. The
--          check and the removal are one atomic step. Bounded: at most ARGV[4] consumers are
--          looked at.
-- KEYS[1]: the stream
-- ARGV[1]: the consumer group
-- ARGV[2]: a consumer to remove if it holds nothing, whatever its idle time ('' for none)
-- ARGV[3]: the idle time in milliseconds above which any consumer holding nothing is removed
--          ('' to remove no other)
-- ARGV[4]: the most consumers to look at
-- returns: the names of the consumers removed

local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local idle_bound, most = tonumber(ARGV[3]), tonumber(ARGV[4])
local removed = {}
if redis.call('EXISTS', stream) == 0 then
    return removed
end
local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, group)
if type(consumers) == 'table' and consumers.err then
    if string.find(consumers.err, 'NOGROUP', 1, true) then
        return removed
    end
    return consumers
end
for i, consumer in ipairs(consumers) do
    if i > most then
        break
    end
    local about = {}
    for j = 1, #consumer, 2 do
        about[consumer[j]] = consumer[j + 1]
    end
    local name, pending, idle = about['name'], tonumber(about['pending']), tonumber(about['idle'])
    if pending == 0 and (name == me or (idle_bound and idle > idle_bound)) then
        redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
        removed[#removed + 1] = name
    end
end
return removed
