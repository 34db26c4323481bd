-- list_jobs with filters: walk part of an index, newest first, and keep the matches.
-- ARGV: index ('all', 'live' or 'state:<state>'), start rank, ranks to walk, matches to
-- skip, matches wanted, task ('' any), queue ('' any), has_text ('0'/'1'), text, state
-- ('' any).
-- The text matches, ignoring the case of ASCII letters, part of the id, the task, the
-- arguments or the error message.
-- Returns {next rank (-1 when the index is exhausted), matches skipped, <fields>...}.
local start, walk = tonumber(ARGV[2]), tonumber(ARGV[3])
local skip, want = tonumber(ARGV[4]), tonumber(ARGV[5])
local task, queue, state = ARGV[6], ARGV[7], ARGV[10]
local text = nil
if ARGV[8] == '1' then
    text = string.lower(ARGV[9])
end

local function has(value)
    return value and string.find(string.lower(value), text, 1, true) ~= nil
end

-- The fields read of each job walked: fewer when no text is looked for.
local function read(jk)
    if text then
        return redis.call('HMGET', jk, 'id', 'task', 'queue', 'payload', 'error', 'state')
    end
    local f = redis.call('HMGET', jk, 'id', 'task', 'queue', 'state')
    return {f[1], f[2], f[3], nil, nil, f[4]}
end

local function matches(f)
    if state ~= '' and f[6] ~= state then
        return false
    end
    if task ~= '' and f[2] ~= task then
        return false
    end
    if queue ~= '' and f[3] ~= queue then
        return false
    end
    if not text then
        return true
    end
    if has(f[1]) or has(f[2]) or has(f[4]) then
        return true
    end
    if f[5] then
        local ok, err = pcall(cjson.decode, f[5])
        if ok and type(err) == 'table' then
            local message = err['message']
            if message ~= nil and message ~= cjson.null and has(tostring(message)) then
                return true
            end
        end
    end
    return false
end

local members = redis.call('ZREVRANGE', P .. ARGV[1], start, start + walk - 1)
local out = {-1, 0}
local skipped, found = 0, 0
for i, m in ipairs(members) do
    local jk = jkey(string.sub(m, 17))
    local f = read(jk)
    if f[1] and matches(f) then
        if skipped < skip then
            skipped = skipped + 1
        else
            out[#out + 1] = redis.call('HGETALL', jk)
            found = found + 1
            if found >= want then
                out[1] = start + i
                out[2] = skipped
                return out
            end
        end
    end
end
if #members == walk then
    out[1] = start + walk
end
out[2] = skipped
return out
