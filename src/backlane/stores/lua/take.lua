-- take: a worker takes jobs handed to it while it waited (see hand_off): each of them it
-- still holds gets the worker's full lease in place of the short one it was handed with.
-- ARGV: worker id, lease_until, ids... Returns the ids among them that were given back
-- before it took them (queued again, or running for another worker): they may run twice.
local worker, lease = ARGV[1], ARGV[2]
local lost = {}
for i = 3, #ARGV do
    local id = ARGV[i]
    local v = redis.call('HMGET', jkey(id), 'state', 'worker_id')
    if v[1] == 'running' and v[2] == worker then
        redis.call('HSET', jkey(id), 'lease_until', lease)
        zput(P .. 'run', lease, id)
        zdel(P .. 'handed', id)
    elseif v[1] == 'queued' or v[1] == 'running' then
        lost[#lost + 1] = id
    end
end
flush()
return lost
