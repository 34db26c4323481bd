-- hand_back: queue again, the attempt uncounted, the jobs a worker holds among ids.
-- ARGV: worker id, ids...
local worker = ARGV[1]
for i = 2, #ARGV do
    local job = load(ARGV[i])
    if job and job.state == 'running' and job.worker_id == worker then
        local attempts = (tonumber(redis.call('HGET', jkey(job.id), 'attempts')) or 1) - 1
        requeue(job, math.max(attempts, 0))
    end
end
flush()
return 0
