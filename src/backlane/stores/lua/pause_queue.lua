-- pause_queue: pause a queue ('1') or resume it ('0'). ARGV: queue, paused.
if ARGV[2] == '1' then
    redis.call('SADD', P .. 'paused', ARGV[1])
elseif redis.call('SREM', P .. 'paused', ARGV[1]) == 1 then
    woke = true
end
flush()
return 0
