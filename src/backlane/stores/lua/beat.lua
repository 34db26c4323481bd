-- beat: record a worker's heartbeat. ARGV: worker id, seen_at, JSON record.
redis.call('HSET', P .. 'workers', ARGV[1], ARGV[3])
redis.call('ZADD', P .. 'workers:seen', ARGV[2], ARGV[1])
return 0
