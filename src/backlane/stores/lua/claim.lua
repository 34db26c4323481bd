-- claim: take up to `limit` claimable jobs for a worker, in claim order: higher priority
-- first, then earlier run_at, then store order; queues paused are skipped.
-- ARGV: token, worker id, now, lease_until, limit, JSON array of queues ('' = every
-- queue), idle mark lifetime (ms).
-- Returns {next_due, <fields of job 1>, <fields of job 2>, ...}. Each job's fields are
-- as they were before the claim: the caller applies what the claim changed (state,
-- attempts + 1, started_at, lease_until, worker_id). next_due is the earliest run_at
-- after now among the jobs left in those queues ('' if none, or if the limit was reached).
local token, worker, now, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit = tonumber(ARGV[5])
local last_claim = P .. 'claim:' .. worker
local last = redis.call('GET', last_claim)
if last and string.sub(last, 1, #token + 1) == token .. ' ' then
    -- sent again after a lost reply: the same jobs, as the first run returned them
    local out = {''}
    for _, id in ipairs(cjson.decode(string.sub(last, #token + 2))) do
        local fields = redis.call('HGETALL', jkey(id))
        local job = {}
        for i = 1, #fields, 2 do
            job[fields[i]] = fields[i + 1]
        end
        if job.state == 'running' and job.worker_id == worker then
            -- undo what the claim changed, which the caller applies again
            for i = 1, #fields, 2 do
                local name = fields[i]
                if name == 'state' then
                    fields[i + 1] = 'queued'
                elseif name == 'attempts' then
                    fields[i + 1] = tostring(tonumber(fields[i + 1]) - 1)
                end
            end
            out[#out + 1] = fields
        end
    end
    return out
end

local names
if ARGV[6] == '' then
    names = redis.call('SMEMBERS', P .. 'queues')
else
    names = cjson.decode(ARGV[6])
end
local paused = {}
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'paused')) do
    paused[queue] = true
end
local levels, priorities, seen = {}, {}, {}
for _, queue in ipairs(names) do
    if not paused[queue] and not seen[queue] then
        seen[queue] = true
        for _, priority in ipairs(redis.call('SMEMBERS', P .. 'prio:' .. queue)) do
            local p = tonumber(priority)
            if not levels[p] then
                levels[p] = {}
                priorities[#priorities + 1] = p
            end
            local level = levels[p]
            level[#level + 1] = {queue, priority, P .. 'due:' .. queue .. ':' .. priority}
        end
    end
end
table.sort(priorities, function(a, b) return a > b end)

local function earlier(a, b)
    if a[2] ~= b[2] then
        return a[2] < b[2]
    end
    return a[1] < b[1]
end

local out = {''}
local ids = {}
local remaining = limit
for _, p in ipairs(priorities) do
    if remaining <= 0 then
        break
    end
    local level = levels[p]
    local candidates = {}
    for _, entry in ipairs(level) do
        local key = entry[3]
        local found = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, remaining)
        for i = 1, #found, 2 do
            candidates[#candidates + 1] = {found[i], tonumber(found[i + 1]), entry}
        end
    end
    if #level > 1 then
        table.sort(candidates, earlier)
    end
    local taken = {}
    for i = 1, math.min(remaining, #candidates) do
        local m, entry = candidates[i][1], candidates[i][3]
        local gone = taken[entry]
        if not gone then
            gone = {}
            taken[entry] = gone
        end
        gone[#gone + 1] = m
        local id = string.sub(m, 17)
        local jk = jkey(id)
        local fields = redis.call('HGETALL', jk)
        local job = {}
        for f = 1, #fields, 2 do
            job[fields[f]] = fields[f + 1]
        end
        move(job, 'running')
        redis.call('HSET', jk, 'state', 'running', 'attempts', tonumber(job.attempts) + 1,
                   'started_at', now, 'lease_until', lease, 'worker_id', worker)
        zput(P .. 'run', lease, id)
        ids[#ids + 1] = id
        out[#out + 1] = fields
        remaining = remaining - 1
    end
    for entry, gone in pairs(taken) do
        for i = 1, #gone, 1000 do
            redis.call('ZREM', entry[3], unpack(gone, i, math.min(i + 999, #gone)))
        end
    end
    for _, entry in ipairs(level) do
        if redis.call('EXISTS', entry[3]) == 0 then
            redis.call('SREM', P .. 'prio:' .. entry[1], entry[2])
        end
    end
end

if remaining > 0 then
    local next_due
    for _, p in ipairs(priorities) do
        for _, entry in ipairs(levels[p]) do
            local later = redis.call('ZRANGEBYSCORE', entry[3], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
            if #later > 0 and (not next_due or tonumber(later[2]) < tonumber(next_due)) then
                next_due = later[2]
            end
        end
    end
    out[1] = next_due or ''
end
if remaining > 0 then
    -- took all there was: the worker may wait now, so work made claimable is announced
    redis.call('SET', P .. 'idle', '1', 'PX', ARGV[7])
end
if #ids > 0 then
    redis.call('SET', last_claim, token .. ' ' .. cjson.encode(ids), 'EX', 120)
end
flush()
return out
