-- backlane SQLite schema, version 3: three indexes fewer, so that storing, releasing,
-- claiming and ending a job each write one or two pages fewer.

-- requeue_expired reads the few deferred and running jobs through jobs_state_created.
DROP INDEX jobs_release;
DROP INDEX jobs_lease;

-- list_jobs without a state merges the newest of each state from jobs_state_created.
DROP INDEX jobs_created;
