-- wait: a worker about to block in wait_for_work offers to take claimable work directly:
-- until it claims again (or the offer lapses), a script that makes a job of its queues
-- claimable hands the job over, running for it, instead of queueing it (see hand_off).
-- ARGV: worker id, capacity (jobs it may take), seconds a job handed to it stays held
-- before the worker takes it (its short lease), seconds it will wait at most before it
-- renews the offer, JSON array of queues ('' = every queue).
-- Then gives back jobs handed to any worker that did not take them in time (as claim
-- does): idle workers find them within one offer period of their short lease's end.
local worker = ARGV[1]
local deadline = string.format('%.17g', server_now() + tonumber(ARGV[4]) + 0.1)
redis.call('HSET', P .. 'waiting', worker,
           ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. deadline .. ' ' .. ARGV[5])
give_back_handed(server_now(), 100)
flush()
return 1
