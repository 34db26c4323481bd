-- renew_leases: extend the leases a worker still holds.
-- ARGV: worker id, lease_until, ids... Returns the ids among them asked to stop.
local worker, lease = ARGV[1], ARGV[2]
local asked = {}
for i = 3, #ARGV do
    local id = ARGV[i]
    local v = redis.call('HMGET', jkey(id), 'state', 'worker_id', 'cancel_requested')
    if v[1] == 'running' and v[2] == worker then
        redis.call('HSET', jkey(id), 'lease_until', lease)
        zput(P .. 'run', lease, id)
        if v[3] == '1' then
            asked[#asked + 1] = id
        end
    end
end
flush()
return asked
