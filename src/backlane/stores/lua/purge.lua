-- purge: remove up to `limit` ended jobs whose keep_until (or, with states, finished_at)
-- is before `before`. ARGV: before, limit, states... (none: by keep_until).
-- Returns {removed, more (1 or 0)}.
local before, limit = ARGV[1], tonumber(ARGV[2])
local removed, waited = 0, {}
local more = 0

local function take(job)
    if remove(job) then
        waited[#waited + 1] = job.id
    end
    removed = removed + 1
end

if #ARGV == 2 then
    local ids = redis.call('ZRANGEBYSCORE', P .. 'kept', '-inf', '(' .. before, 'LIMIT', 0, limit)
    for _, id in ipairs(ids) do
        local job = load(id)
        if job and TERMINAL[job.state] then
            take(job)
        else
            zdel(P .. 'kept', id)
        end
    end
    if #ids == limit then
        more = 1
    end
else
    for i = 3, #ARGV do
        local key = P .. 'fin:' .. ARGV[i]
        local ids = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. before, 'LIMIT', 0, limit - removed)
        for _, id in ipairs(ids) do
            local job = load(id)
            if job and job.state == ARGV[i] then
                take(job)
            else
                zdel(key, id)
            end
        end
        if removed >= limit then
            more = 1
            break
        end
    end
end
for _, id in ipairs(waited) do
    unblock(id)
end
flush()
return {removed, more}
