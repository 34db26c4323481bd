-- finish: record how attempts ended, for the jobs their worker still holds.
-- ARGV: JSON array of outcomes {id, worker_id, state, finished_at, result?, error?,
-- run_at?, keep_until?} (string values). Returns the ids applied.
local applied = finish_outcomes(ARGV[1])
flush()
return applied
