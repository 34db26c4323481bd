-- take: a worker takes jobs handed to it while it waited (see take_jobs in common.lua).
-- ARGV: worker id, lease_until, ids... Returns the ids among them that were given back
-- before it took them (queued again, or running for another worker): they may run twice.
local lost = take_jobs(ARGV[1], ARGV[2], ARGV, 3)
flush()
return lost
