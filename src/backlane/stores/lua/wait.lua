-- wait: a worker about to block in wait_for_work offers to take claimable work directly:
-- until it claims again (or the offer lapses), a script that makes a job of its queues
-- claimable hands the job over, running for it, instead of queueing it (see hand_off).
-- ARGV: worker id, capacity (jobs it may take), lease seconds, seconds it will wait at
-- most before it renews the offer, JSON array of queues ('' = every queue).
local worker = ARGV[1]
local deadline = string.format('%.17g', server_now() + tonumber(ARGV[4]) + 0.1)
redis.call('HSET', P .. 'waiting', worker,
           ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. deadline .. ' ' .. ARGV[5])
return 1
