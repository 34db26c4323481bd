-- claim: take up to `limit` claimable jobs for a worker, in claim order: higher priority
-- first, then earlier run_at, then store order; queues paused are skipped.
-- ARGV: token, worker id, now, lease_until, limit, JSON array of queues ('' = every
-- queue), idle mark lifetime (ms), and, for a worker that waits next (else ''), the short
-- lease of jobs handed to it and how long its offer lasts (see claim_jobs).
-- Returns {next_due, <fields of job 1>, <fields of job 2>, ...}. Each job's fields are
-- as they were before the claim: the caller applies what the claim changed (state,
-- attempts + 1, started_at, lease_until, worker_id). next_due is the earliest run_at
-- after now among the jobs left in those queues ('' if none, or if the limit was reached).
local out = claim_jobs(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6],
                       ARGV[7], ARGV[8], ARGV[9])
flush()
return out
