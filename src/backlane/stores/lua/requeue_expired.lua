-- requeue_expired: running jobs whose lease ended before now are queued again (or end
-- cancelled when asked to stop; a job handed to a waiting worker that never took it goes
-- back uncounted); deferred jobs whose release_at is not after now are
-- queued. At most `limit` of each per call.
-- ARGV: now, keep_until ('' for none), limit. Returns {changed, more (1 or 0)}.
local now, keep_until, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local changed = 0
local expired = redis.call('ZRANGEBYSCORE', P .. 'run', '-inf', '(' .. now, 'LIMIT', 0, limit)
for _, id in ipairs(expired) do
    local job = load(id)
    if job and job.state == 'running' then
        if job.cancel_requested == '1' then
            zdel(P .. 'run', id)
            redis.call('HDEL', jkey(id), 'lease_until')
            end_job(job, 'cancelled', now, keep_until)
        elseif untaken(job) then -- handed to a waiting worker that never took it
            requeue(job, math.max((tonumber(redis.call('HGET', jkey(id), 'attempts')) or 1) - 1, 0))
        else
            requeue(job)
        end
        changed = changed + 1
    else
        zdel(P .. 'run', id)
    end
end
local overdue = redis.call('ZRANGEBYSCORE', P .. 'defer', '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(overdue) do
    zdel(P .. 'defer', id)
    local job = load(id)
    if job and job.state == 'deferred' then
        redis.call('HSET', jkey(id), 'state', 'queued')
        move(job, 'queued')
        make_claimable(job)
        changed = changed + 1
    end
end
flush()
local more = 0
if #expired == limit or #overdue == limit then
    more = 1
end
return {changed, more}
