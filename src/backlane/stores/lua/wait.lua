-- wait: a worker about to block in wait_for_work offers to take claimable work directly:
-- until it claims again (or the offer lapses), a script that makes a job of its queues
-- claimable hands the job over, running for it, instead of queueing it (see hand_off).
-- ARGV: worker id, capacity (jobs it may take), seconds a job handed to it stays held
-- before the worker takes it (its short lease), seconds it will wait at most before it
-- renews the offer, JSON array of queues ('' = every queue); then, if the worker takes
-- jobs handed to it before (as take does, in the same call), their lease_until and ids.
-- Then gives back jobs handed to any worker that did not take them in time (as claim
-- does): idle workers find them within one offer period of their short lease's end.
-- Returns the ids of the jobs taken that were given back before (see take).
local worker = ARGV[1]
local lost = {}
if #ARGV > 6 then
    lost = take_jobs(worker, ARGV[6], ARGV, 7)
end
local deadline = string.format('%.17g', server_now() + tonumber(ARGV[4]) + 0.1)
redis.call('HSET', P .. 'waiting', worker,
           ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. deadline .. ' ' .. ARGV[5])
give_back_handed(server_now(), 100)
flush()
return lost
