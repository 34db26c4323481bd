-- cancel: a deferred or queued job ends cancelled; a running one is asked to stop.
-- ARGV: id, now, keep_until ('' for none). Returns the state after, or nil (no such job).
local job = load(ARGV[1])
if not job then
    return nil
end
if job.state == 'deferred' or job.state == 'queued' then
    zdel(P .. 'defer', job.id)
    zdel(due_key(job), member(job))
    end_job(job, 'cancelled', ARGV[2], ARGV[3])
elseif job.state == 'running' then
    redis.call('HSET', jkey(job.id), 'cancel_requested', '1')
end
flush()
return job.state
