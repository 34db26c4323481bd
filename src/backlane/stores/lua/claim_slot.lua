-- claim_slot: take a schedule's slot and store its job, or do nothing.
-- ARGV: token, schedule name, slot, JSON object of the job's string fields.
-- Returns 1 when the slot was taken (the job stored, or its key held), else 0.
local token, name, slot = ARGV[1], ARGV[2], ARGV[3]
local cached = replayed(token)
if cached then
    return tonumber(cached)
end
local last = redis.call('HGET', P .. 'sched', name)
if last and last ~= '' and tonumber(last) >= tonumber(slot) then
    return 0
end
local fields = cjson.decode(ARGV[4])
local refused = check_new({fields})
if refused then
    return refused
end
insert(fields, {}, redis.call('INCR', P .. 'seq'))
redis.call('HSET', P .. 'sched', name, slot)
remember(token, '1')
flush()
return 1
