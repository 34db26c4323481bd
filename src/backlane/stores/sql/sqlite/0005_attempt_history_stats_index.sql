-- backlane SQLite schema, version 5: the history of a job's attempts, and stats read from
-- an index alone.

-- The records of the attempts that ended without succeeding, a JSON array appended to by
-- finish (NULL: none).
ALTER TABLE jobs ADD COLUMN attempt_history TEXT;

-- stats reads started_at and run_at of every job ended within the hour: from the index,
-- not from each job's row. The same index serves purge by end state and end time.
DROP INDEX jobs_finished;
CREATE INDEX jobs_finished ON jobs (state, finished_at, started_at, run_at)
    WHERE finished_at IS NOT NULL;
