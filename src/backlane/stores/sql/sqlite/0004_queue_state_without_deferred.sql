-- backlane SQLite schema, version 4: storing a request's job writes one index fewer.
-- counts reads the deferred jobs, few (each is held for one response), through
-- jobs_state_created; jobs_queue_state serves the rest.
DROP INDEX jobs_queue_state;
CREATE INDEX jobs_queue_state ON jobs (queue, state) WHERE state <> 'deferred';
