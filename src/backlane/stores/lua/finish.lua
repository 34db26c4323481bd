-- finish: record how attempts ended, for the jobs their worker still holds.
-- ARGV: JSON array of outcomes {id, worker_id, state, finished_at, result?, error?,
-- run_at?, keep_until?} (string values). Returns the ids applied.
local applied = {}
for _, o in ipairs(cjson.decode(ARGV[1])) do
    local id = o.id
    local jk = jkey(id)
    local v = redis.call('HMGET', jk, 'state', 'worker_id', 'queue', 'priority', 'seq',
                         'created_at', 'run_at', 'key', 'waited')
    if v[1] == 'running' and v[2] == o.worker_id then
        local job = {id = id, state = v[1], queue = v[3], priority = v[4], seq = v[5],
                     created_at = v[6], run_at = v[7], key = v[8] or nil}
        zdel(P .. 'run', id)
        local set, unset = {}, {'lease_until'}
        if o.result then
            set[#set + 1] = 'result'
            set[#set + 1] = o.result
        else
            unset[#unset + 1] = 'result'
        end
        if o.error then
            set[#set + 1] = 'error'
            set[#set + 1] = o.error
        else
            unset[#unset + 1] = 'error'
        end
        local state = o.state
        move(job, state)
        if state == 'queued' then
            unset[#unset + 1] = 'worker_id'
            if o.run_at then
                set[#set + 1] = 'run_at'
                set[#set + 1] = o.run_at
                job.run_at = o.run_at
            end
            redis.call('HSET', jk, 'state', 'queued', unpack(set))
            redis.call('HDEL', jk, unpack(unset))
            make_claimable(job)
        else
            local keep = o.keep_until
            if keep then
                set[#set + 1] = 'keep_until'
                set[#set + 1] = keep
                zput(P .. 'kept', keep, id)
            else
                unset[#unset + 1] = 'keep_until'
            end
            redis.call('HSET', jk, 'state', state, 'finished_at', o.finished_at, unpack(set))
            redis.call('HDEL', jk, unpack(unset))
            zput(P .. 'fin:' .. state, o.finished_at, id)
            if v[9] then
                unblock(id)
            end
        end
        applied[#applied + 1] = id
    end
end
flush()
return applied
