-- discard: deferred jobs among ids end discarded. ARGV: now, keep_until ('' for none), ids...
local now, keep_until = ARGV[1], ARGV[2]
for i = 3, #ARGV do
    local job = load(ARGV[i])
    if job and job.state == 'deferred' then
        zdel(P .. 'defer', job.id)
        end_job(job, 'discarded', now, keep_until)
    end
end
flush()
return 0
