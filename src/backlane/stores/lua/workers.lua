-- workers: drop the records of workers not seen since `seen_since`, return the rest.
-- ARGV: seen_since. Returns the JSON records.
local seen = P .. 'workers:seen'
local stale = redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. ARGV[1])
for _, id in ipairs(stale) do
    redis.call('HDEL', P .. 'workers', id)
    redis.call('ZREM', seen, id)
end
return redis.call('HVALS', P .. 'workers')
