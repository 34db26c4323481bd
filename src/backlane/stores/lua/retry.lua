-- retry: queue again, at now, a job that failed or was cancelled, unless its key is held.
-- ARGV: id, now. Returns 1 when queued, else 0.
local job = load(ARGV[1])
if not job or (job.state ~= 'failed' and job.state ~= 'cancelled') then
    return 0
end
if job.key and redis.call('HEXISTS', P .. 'keys', job.key) == 1 then
    return 0
end
local jk = jkey(job.id)
if job.after then
    local before = redis.call('HGET', jkey(job.after), 'state')
    if not before or TERMINAL[before] then
        redis.call('SREM', P .. 'wait:' .. job.after, job.id)
        redis.call('HDEL', jk, 'after')
        job.after = nil
    end
end
zdel(P .. 'kept', job.id)
zdel(P .. 'fin:' .. job.state, job.id)
tally(job.state, job.finished_at, job.started_at, job.run_at, -1)
move(job, 'queued')
redis.call('HSET', jk, 'state', 'queued', 'run_at', ARGV[2])
redis.call('HDEL', jk, 'finished_at', 'keep_until', 'lease_until', 'worker_id', 'result',
           'cancel_requested')
job.run_at = ARGV[2]
make_claimable(job)
flush()
return 1
