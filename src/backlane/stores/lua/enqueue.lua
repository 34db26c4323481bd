-- enqueue: store a batch of jobs, all or none.
-- ARGV: token, JSON array of jobs (objects of string fields, None fields left out).
-- Returns, per job, its `after` as stored ('' for none) or, when an active job holds its
-- key, the holder's fields.
local token = ARGV[1]
local cached = replayed(token)
if cached then
    return cjson.decode(cached)
end
local batch = cjson.decode(ARGV[2])
local refused = check_new(batch)
if refused then
    return refused
end
local seq = redis.call('INCRBY', P .. 'seq', #batch) - #batch
local replaced = {}
local out = {}
for i, fields in ipairs(batch) do
    out[i] = insert(fields, replaced, seq + i)
end
remember(token, cjson.encode(out))
flush()
return out
