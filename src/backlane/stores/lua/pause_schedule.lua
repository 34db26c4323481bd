-- pause_schedule: pause a schedule ('1') or resume it ('0'), recording it if unknown.
-- ARGV: name, paused.
redis.call('HSETNX', P .. 'sched', ARGV[1], '')
if ARGV[2] == '1' then
    redis.call('SADD', P .. 'sched:paused', ARGV[1])
else
    redis.call('SREM', P .. 'sched:paused', ARGV[1])
end
return 0
