-- claim_slot: take a schedule's slot and store its job, or do nothing.
-- ARGV: schedule name, slot, JSON object of the job's string fields.
-- Returns 1 when the slot was taken (the job stored, or its key held), else 0. Sent again
-- after a lost reply, it finds the slot taken with its own job and returns 1.
local name, slot = ARGV[1], ARGV[2]
local fields = cjson.decode(ARGV[3])
local last = redis.call('HGET', P .. 'sched', name)
if last and last ~= '' and tonumber(last) >= tonumber(slot) then
    if last == slot and redis.call('EXISTS', jkey(fields.id)) == 1 then
        return 1
    end
    return 0
end
local refused = check_new({fields}, '')
if refused then
    return refused
end
insert(fields, {}, redis.call('INCR', P .. 'seq'))
redis.call('HSET', P .. 'sched', name, slot)
flush()
return 1
