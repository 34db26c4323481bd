-- list_jobs without text, task or queue filters: one page of an index, newest first.
-- ARGV: index ('all' or 'state:<state>'), offset, limit. Returns the jobs' fields.
local offset, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if limit <= 0 then
    return {}
end
local out = {}
for _, m in ipairs(redis.call('ZREVRANGE', P .. ARGV[1], offset, offset + limit - 1)) do
    local fields = redis.call('HGETALL', jkey(string.sub(m, 17)))
    if #fields > 0 then
        out[#out + 1] = fields
    end
end
return out
