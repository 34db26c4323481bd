-- finish_claim: finish's outcomes, then a claim, in one call (a worker's loop turn).
-- ARGV: outcomes as finish takes them (JSON array, '[]' for none), then claim's ARGV.
-- Returns {<ids applied>, next_due, <fields of job 1>, ...} (see claim). Sent again after
-- a lost reply, the outcomes are ignored (their jobs are no longer held) and the claim
-- returns the same jobs.
local applied = finish_outcomes(ARGV[1])
local out = claim_jobs(ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7],
                       ARGV[8], ARGV[9], ARGV[10])
flush()
table.insert(out, 1, applied)
return out
