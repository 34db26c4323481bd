-- set_progress: record progress and message of a job its worker still holds.
-- ARGV: id, worker id, progress ('' for none), has_message ('0'/'1'), message.
local jk = jkey(ARGV[1])
local v = redis.call('HMGET', jk, 'state', 'worker_id')
if v[1] ~= 'running' or v[2] ~= ARGV[2] then
    return 0
end
if ARGV[3] == '' then
    redis.call('HDEL', jk, 'progress')
else
    redis.call('HSET', jk, 'progress', ARGV[3])
end
if ARGV[4] == '1' then
    redis.call('HSET', jk, 'message', ARGV[5])
else
    redis.call('HDEL', jk, 'message')
end
return 1
