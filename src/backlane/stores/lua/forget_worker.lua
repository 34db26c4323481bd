-- forget_worker: remove a worker's record. ARGV: worker id.
redis.call('HDEL', P .. 'workers', ARGV[1])
redis.call('ZREM', P .. 'workers:seen', ARGV[1])
return 0
