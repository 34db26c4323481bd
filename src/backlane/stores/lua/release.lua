-- release: deferred jobs among ids become queued. ARGV: ids...
for i = 1, #ARGV do
    local job = load(ARGV[i])
    if job and job.state == 'deferred' then
        zdel(P .. 'defer', job.id)
        redis.call('HSET', jkey(job.id), 'state', 'queued')
        move(job, 'queued')
        make_claimable(job)
    end
end
flush()
return 0
