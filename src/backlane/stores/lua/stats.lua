-- stats: part of the jobs that ended in one state at or after a score (and before `to`),
-- counted per bucket, from the jobs themselves.
-- ARGV: state, from (a finished_at), skip (entries at exactly `from` already counted),
-- width, count, to (a ZRANGEBYSCORE bound: '+inf', or '(' and a finished_at). Returns
-- {walked, last score walked, entries at that score walked in all, bucket, jobs,
-- wait_total, wait_count, bucket, ...}; numbers that may have fractions come as strings.
-- The caller goes on from the last score, so each call costs the same however far into
-- the set it is.
local key = P .. 'fin:' .. ARGV[1]
local from, skip = ARGV[2], tonumber(ARGV[3])
local width = tonumber(ARGV[4])
local found = redis.call('ZRANGEBYSCORE', key, from, ARGV[6], 'WITHSCORES', 'LIMIT', skip,
                          tonumber(ARGV[5]))
local buckets, order = {}, {}
for i = 1, #found, 2 do
    local index = math.floor(tonumber(found[i + 1]) / width)
    local bucket = buckets[index]
    if not bucket then
        bucket = {0, 0.0, 0}
        buckets[index] = bucket
        order[#order + 1] = index
    end
    bucket[1] = bucket[1] + 1
    local times = redis.call('HMGET', jkey(found[i]), 'started_at', 'run_at')
    local started, run_at = tonumber(times[1]), tonumber(times[2]) -- nil: changed by hand
    if started and run_at then
        if started >= run_at then
            bucket[2] = bucket[2] + (started - run_at)
            bucket[3] = bucket[3] + 1
        end
    end
end
local last, at_last = from, skip
for i = 1, #found, 2 do
    if found[i + 1] == last then
        at_last = at_last + 1
    else
        last, at_last = found[i + 1], 1
    end
end
local out = {#found / 2, last, at_last}
for _, index in ipairs(order) do
    local bucket = buckets[index]
    out[#out + 1] = string.format('%.17g', index)
    out[#out + 1] = bucket[1]
    out[#out + 1] = string.format('%.17g', bucket[2])
    out[#out + 1] = bucket[3]
end
return out
