-- forget_worker: remove a worker's record, its offer to take work, and give back, the
-- attempt uncounted, the jobs handed to it that it never took. ARGV: worker id.
local worker = ARGV[1]
redis.call('HDEL', P .. 'workers', worker)
redis.call('ZREM', P .. 'workers:seen', worker)
redis.call('HDEL', P .. 'waiting', worker)
for _, list in ipairs({P .. 'hand:' .. worker, P .. 'took:' .. worker}) do
    for _, text in ipairs(redis.call('LRANGE', list, 0, -1)) do
        for _, fields in ipairs(cjson.decode(text)) do
            for i = 1, #fields, 2 do
                if fields[i] == 'id' then
                    local job = load(fields[i + 1])
                    if job and job.state == 'running' and job.worker_id == worker then
                        local attempts = (tonumber(redis.call('HGET', jkey(job.id), 'attempts')) or 1)
                        requeue(job, math.max(attempts - 1, 0))
                    end
                end
            end
        end
    end
    redis.call('DEL', list)
end
flush()
return 0
