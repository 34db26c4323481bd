-- enqueue: store a batch of jobs, all or none.
-- ARGV: token (unique to this call), JSON array of jobs (objects of string fields, None
-- fields left out); or, for one job, its fields as name, value, name, value...
-- Returns, per job, its `after` as stored ('' for none) or, when an active job holds its
-- key, the holder's fields. Sent again after a lost reply, it stores only what the first
-- run did not, and returns the same.
local token = ARGV[1]
local batch
if #ARGV == 2 then
    batch = cjson.decode(ARGV[2])
else
    local fields = {}
    for i = 2, #ARGV, 2 do
        fields[ARGV[i]] = ARGV[i + 1]
    end
    batch = {fields}
end
local refused, stored = check_new(batch, token)
if refused then
    return refused
end
local seq = redis.call('INCRBY', P .. 'seq', #batch) - #batch
local replaced = {}
local out = {}
local tag = token
for i, fields in ipairs(batch) do
    if stored[fields.id] then
        out[i] = redis.call('HGET', jkey(fields.id), 'after') or ''
        tag = nil
    else
        out[i] = insert(fields, replaced, seq + i, tag)
        if type(out[i]) == 'string' then
            tag = nil
        end
    end
end
flush()
return out
