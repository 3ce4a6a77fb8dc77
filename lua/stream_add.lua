-- name: stream_add
-- version: 1
-- purpose: append a message to a priority-level stream of a queue, creating the stream with the
--          consumer group when it is the level's first message, so the level's key exists only
--          once it is used and a worker that finds it reads it from its first entry. (Level 0,
--          the queue itself, is a plain XADD, as in taskiq-redis 1.2.)
-- KEYS[1]: the level stream ({queue}:priority:N)
-- ARGV[1]: the consumer group to create with the stream
-- ARGV[2]: MAXLEN to trim to, or '' for no trimming
-- ARGV[3]: '~' to trim approximately, '=' to trim exactly
-- ARGV[4]: the message (the entry's data field)
-- returns: the id of the new entry

local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, ARGV[1], '0', 'MKSTREAM')
end
if ARGV[2] ~= '' then
    return redis.call('XADD', stream, 'MAXLEN', ARGV[3], ARGV[2], '*', 'data', ARGV[4])
end
return redis.call('XADD', stream, '*', 'data', ARGV[4])
