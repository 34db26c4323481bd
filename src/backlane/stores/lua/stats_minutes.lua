-- stats_minutes: the tallies (see tally) of the minutes from `from` on that are still kept.
-- ARGV: from (a multiple of 60). Returns {first, minute, succeeded, failed, cancelled,
-- wait_us, waits, minute, ...}, minutes in order: the tallies count every job stored that
-- ended at or after `first` (first >= from); the caller counts those that ended before
-- `first` from the jobs themselves (see stats).
local first = math.max(tonumber(ARGV[1]), tallies_kept_from())
local out = {string.format('%.17g', first)}
for _, minute in ipairs(redis.call('ZRANGEBYSCORE', P .. 'ends', first, '+inf')) do
    local v = redis.call('HMGET', P .. 'ends:' .. minute, unpack(TALLY_FIELDS))
    out[#out + 1] = minute
    for i = 1, #TALLY_FIELDS do
        out[#out + 1] = v[i] or '0'
    end
end
return out
