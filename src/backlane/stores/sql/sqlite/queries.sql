-- The statements of backlane's SQLite store, one per "-- name:" block.
-- Lists of ids come as one JSON array parameter, read with json_each.
-- The hot statements name their index (INDEXED BY): their plan must not depend on the
-- planner's statistics, and a missing index is an error rather than a slow table scan.

-- name: insert_job
-- Stores one job unless an active job holds its key (then changes nothing). Positional
-- parameters, in the order of Job's fields: binding 24 named ones costs more than the
-- insert itself.
INSERT INTO jobs (task, payload, id, queue, priority, state, "key", attempts, run_at,
                  created_at, started_at, finished_at, lease_until, worker_id, progress,
                  message, result, error, "after", cancel_requested, release_at,
                  keep_until, meta, attempt_history)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT ("key") WHERE "key" IS NOT NULL AND state IN ('deferred', 'queued', 'running')
DO NOTHING;

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: get_key_holder
SELECT * FROM jobs
WHERE "key" = :key AND state IN ('deferred', 'queued', 'running');

-- name: release_one
-- release, for the usual request that added one task.
UPDATE jobs SET state = 'queued' WHERE id = :id AND state = 'deferred';

-- name: release
UPDATE jobs INDEXED BY jobs_id SET state = 'queued'
WHERE state = 'deferred' AND id IN (SELECT value FROM json_each(:ids));

-- name: discard
UPDATE jobs INDEXED BY jobs_id
SET state = 'discarded', finished_at = :now, keep_until = :keep_until
WHERE state = 'deferred' AND id IN (SELECT value FROM json_each(:ids))
RETURNING id;

-- name: unblock
-- Frees the jobs that waited for any of the given (ended or removed) jobs.
UPDATE jobs INDEXED BY jobs_after SET "after" = NULL
WHERE "after" IN (SELECT value FROM json_each(:ids));

-- name: unblock_one
-- unblock, for the usual job that ends alone: a third of the cost without json_each.
UPDATE jobs INDEXED BY jobs_after SET "after" = NULL WHERE "after" = :id;

-- name: claimable_any
-- A claim is two steps in one transaction: the claimable jobs, in claim order, then
-- claim_one or claim_seqs. One UPDATE ... WHERE seq IN (subquery) RETURNING * costs
-- about twice as much for the usual single job.
SELECT seq FROM jobs INDEXED BY jobs_claimable_any
WHERE state = 'queued' AND "after" IS NULL AND run_at <= :now
  AND queue NOT IN (SELECT queue FROM paused_queues)
ORDER BY priority DESC, run_at, seq
LIMIT :limit;

-- name: paused_queues
SELECT queue FROM paused_queues;

-- name: claimable_queue
-- The store leaves paused queues out of the names it gives claimable_queue and
-- claimable_queues, so that a paused queue's backlog is never scanned; the clause on
-- paused_queues states the rule all the same.
SELECT seq FROM jobs INDEXED BY jobs_claimable
WHERE state = 'queued' AND "after" IS NULL AND run_at <= :now AND queue = :queue
  AND queue NOT IN (SELECT queue FROM paused_queues)
ORDER BY priority DESC, run_at, seq
LIMIT :limit;

-- name: claimable_queues
SELECT seq FROM jobs INDEXED BY jobs_claimable
WHERE state = 'queued' AND "after" IS NULL AND run_at <= :now
  AND queue IN (SELECT value FROM json_each(:queues))
  AND queue NOT IN (SELECT queue FROM paused_queues)
ORDER BY priority DESC, run_at, seq
LIMIT :limit;

-- name: claim_one
-- Claims the one job a claimable_* query found, by its rowid (NOT INDEXED: not through
-- jobs_state_created, for state = 'queued').
UPDATE jobs NOT INDEXED
SET state = 'running', attempts = attempts + 1, started_at = :now,
    lease_until = :lease_until, worker_id = :worker_id
WHERE seq = :seq AND state = 'queued'
RETURNING *;

-- name: claim_seqs
-- Claims the jobs a claimable_* query found (a JSON array of their seq; :was 'queued'),
-- or those a handed_claimable_* query found (:was 'deferred').
UPDATE jobs NOT INDEXED
SET state = 'running', attempts = attempts + 1, started_at = :now,
    lease_until = :lease_until, worker_id = :worker_id
WHERE seq IN (SELECT value FROM json_each(:seqs)) AND state = :was
RETURNING *;

-- name: handed_claimable_any
-- finish_and_claim's released jobs that a claim would take, in claim order, while they
-- are still deferred: when every queued claimable job fits in the claim, they go straight
-- from deferred to running, without a pass through queued (and its indexes).
SELECT seq FROM jobs INDEXED BY jobs_id
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'deferred' AND "after" IS NULL
  AND run_at <= :now AND queue NOT IN (SELECT queue FROM paused_queues)
ORDER BY priority DESC, run_at, seq
LIMIT :limit;

-- name: handed_claimable_queues
SELECT seq FROM jobs INDEXED BY jobs_id
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'deferred' AND "after" IS NULL
  AND run_at <= :now AND queue IN (SELECT value FROM json_each(:queues))
  AND queue NOT IN (SELECT queue FROM paused_queues)
ORDER BY priority DESC, run_at, seq
LIMIT :limit;

-- name: claim_handed_any
-- handed_claimable_any and claim_seqs in one statement, for a claim with room for every
-- job released to it, whose rows this process still knows (it stored them): the few
-- columns the claim set or may have changed come back, not the whole row.
UPDATE jobs INDEXED BY jobs_id
SET state = 'running', attempts = attempts + 1, started_at = :now,
    lease_until = :lease_until, worker_id = :worker_id
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'deferred' AND "after" IS NULL
  AND run_at <= :now AND queue NOT IN (SELECT queue FROM paused_queues)
RETURNING seq, id, attempts;

-- name: claim_handed_queues
UPDATE jobs INDEXED BY jobs_id
SET state = 'running', attempts = attempts + 1, started_at = :now,
    lease_until = :lease_until, worker_id = :worker_id
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'deferred' AND "after" IS NULL
  AND run_at <= :now AND queue IN (SELECT value FROM json_each(:queues))
  AND queue NOT IN (SELECT queue FROM paused_queues)
RETURNING seq, id, attempts;

-- name: renew_leases
UPDATE jobs INDEXED BY jobs_id SET lease_until = :lease_until
WHERE state = 'running' AND worker_id = :worker_id
  AND id IN (SELECT value FROM json_each(:ids))
RETURNING id, cancel_requested;

-- name: finish_retry
UPDATE jobs
SET state = 'queued', lease_until = NULL, worker_id = NULL, result = :result,
    error = :error, run_at = COALESCE(:run_at, run_at)
WHERE id = :id AND state = 'running' AND worker_id = :worker_id;

-- name: finish_end
UPDATE jobs
SET state = :state, lease_until = NULL, result = :result, error = :error,
    finished_at = :finished_at, keep_until = :keep_until
WHERE id = :id AND state = 'running' AND worker_id = :worker_id;

-- name: fail_unreadable
-- A job just claimed whose row does not read as a job ends failed, kept until removed by
-- hand; a column that does not hold what it should (JSON Python reads, a number, a known
-- state) is reset, so that the job reads from now on.
UPDATE jobs
SET state = 'failed', lease_until = NULL, finished_at = :now, keep_until = NULL,
    error = :error, result = NULL,
    priority = CASE WHEN typeof(priority) = 'integer' THEN priority ELSE 0 END,
    run_at = CASE WHEN typeof(run_at) IN ('integer', 'real') THEN run_at ELSE :now END,
    meta = CASE WHEN :meta_reads THEN meta ELSE '{}' END,
    attempt_history = CASE WHEN :history_reads THEN attempt_history END
WHERE seq = :seq;

-- name: append_attempt
-- finish, for an outcome that carries its attempt's record (not the hot path: an attempt
-- that succeeds carries none).
UPDATE jobs SET attempt_history = json_insert(COALESCE(attempt_history, '[]'), '$[#]',
                                              json(:attempt))
WHERE id = :id;

-- name: hand_back
UPDATE jobs INDEXED BY jobs_id
SET state = 'queued', lease_until = NULL, worker_id = NULL,
    attempts = MAX(attempts - 1, 0)
WHERE state = 'running' AND worker_id = :worker_id
  AND id IN (SELECT value FROM json_each(:ids));

-- name: cancel_expired_leases
-- Running jobs asked to stop whose worker stopped answering end cancelled, not queued.
-- This and the next two read the running (or deferred) jobs of jobs_state_created: few,
-- no more than the workers' concurrency (deferred ones are each held for one response).
UPDATE jobs INDEXED BY jobs_state_created
SET state = 'cancelled', lease_until = NULL, finished_at = :now, keep_until = :keep_until
WHERE state = 'running' AND lease_until < :now AND cancel_requested = 1
RETURNING id;

-- name: requeue_expired_leases
UPDATE jobs INDEXED BY jobs_state_created
SET state = 'queued', lease_until = NULL, worker_id = NULL
WHERE state = 'running' AND lease_until < :now AND cancel_requested = 0;

-- name: requeue_overdue_deferred
UPDATE jobs INDEXED BY jobs_state_created SET state = 'queued'
WHERE state = 'deferred' AND release_at IS NOT NULL AND release_at <= :now;

-- name: cancel_waiting
UPDATE jobs SET state = 'cancelled', finished_at = :now, keep_until = :keep_until
WHERE id = :id AND state IN ('deferred', 'queued');

-- name: request_cancel
UPDATE jobs SET cancel_requested = 1 WHERE id = :id AND state = 'running';

-- name: retry
UPDATE jobs
SET state = 'queued', run_at = :now, finished_at = NULL, keep_until = NULL,
    lease_until = NULL, worker_id = NULL, result = NULL, cancel_requested = 0,
    "after" = :after
WHERE id = :id AND state IN ('failed', 'cancelled');

-- name: set_progress
UPDATE jobs SET progress = :progress, message = :message
WHERE id = :id AND state = 'running' AND worker_id = :worker_id;

-- name: delete
DELETE FROM jobs INDEXED BY jobs_id WHERE id IN (SELECT value FROM json_each(:ids));

-- name: purge_kept
-- A batch of ended jobs past their retention.
SELECT seq, id FROM jobs INDEXED BY jobs_keep_until
WHERE state IN ('succeeded', 'failed', 'cancelled', 'discarded') AND keep_until < :before
LIMIT :limit;

-- name: purge_finished
-- A batch of jobs that ended in one of the given states before a time.
SELECT seq, id FROM jobs INDEXED BY jobs_finished
WHERE state IN (SELECT value FROM json_each(:states)) AND finished_at < :before
LIMIT :limit;

-- name: delete_seqs
DELETE FROM jobs WHERE seq IN (SELECT value FROM json_each(:seqs));

-- name: text_matches
-- list_jobs' text filter: a LIKE pattern (with \ escaping % and _) against the id, task,
-- arguments and error message.
id LIKE :pattern ESCAPE '\' OR task LIKE :pattern ESCAPE '\'
OR payload LIKE :pattern ESCAPE '\'
OR json_extract(error, '$.message') LIKE :pattern ESCAPE '\'

-- name: text_matches_verbatim
-- text_matches, for a text that JSON writes as is (printable ASCII, no quote or
-- backslash): the message can hold it only if the error's JSON text does, so the message
-- is extracted only from the few rows whose error matches.
id LIKE :pattern ESCAPE '\' OR task LIKE :pattern ESCAPE '\'
OR payload LIKE :pattern ESCAPE '\'
OR (error LIKE :pattern ESCAPE '\'
    AND json_extract(error, '$.message') LIKE :pattern ESCAPE '\')

-- name: counts
-- Deferred and running jobs, few, are left out of jobs_queue_state and read by state.
SELECT queue, state, COUNT(*) AS n FROM jobs INDEXED BY jobs_queue_state
WHERE state NOT IN ('deferred', 'running') GROUP BY queue, state
UNION ALL
SELECT queue, state, COUNT(*) AS n FROM jobs INDEXED BY jobs_state_created
WHERE state IN ('deferred', 'running') GROUP BY queue, state;

-- name: stats
-- Jobs that ended since a time, per bucket of a width: the bucket is the number of widths
-- since the epoch, rounded down (CAST rounds toward zero, hence the correction).
SELECT bucket,
       SUM(state = 'succeeded') AS succeeded,
       SUM(state = 'failed') AS failed,
       SUM(state = 'cancelled') AS cancelled,
       TOTAL(CASE WHEN started_at >= run_at THEN started_at - run_at END) AS wait_total,
       COUNT(CASE WHEN started_at >= run_at THEN 1 END) AS wait_count
FROM (
    SELECT state, started_at, run_at,
           CAST(finished_at / :width AS INTEGER)
           - (finished_at / :width < CAST(finished_at / :width AS INTEGER)) AS bucket
    FROM jobs INDEXED BY jobs_finished
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= :since
)
GROUP BY bucket
ORDER BY bucket;

-- name: take_slot
-- Records a slot as the schedule's latest unless it or a later one was taken; returns the
-- name only when the slot was taken now.
INSERT INTO schedules (name, last_slot) VALUES (:name, :slot)
ON CONFLICT (name) DO UPDATE SET last_slot = excluded.last_slot
WHERE last_slot IS NULL OR last_slot < excluded.last_slot
RETURNING name;

-- name: schedules
SELECT name, last_slot, paused FROM schedules ORDER BY name;

-- name: pause_schedule
INSERT INTO schedules (name, paused) VALUES (:name, :paused)
ON CONFLICT (name) DO UPDATE SET paused = excluded.paused;

-- name: pause_queue
INSERT INTO paused_queues (queue) VALUES (:queue) ON CONFLICT (queue) DO NOTHING;

-- name: resume_queue
DELETE FROM paused_queues WHERE queue = :queue;

-- name: beat
INSERT INTO workers (id, started_at, seen_at, concurrency, queues, jobs, processed)
VALUES (:id, :started_at, :seen_at, :concurrency, :queues, :jobs, :processed)
ON CONFLICT (id) DO UPDATE SET
    started_at = excluded.started_at, seen_at = excluded.seen_at,
    concurrency = excluded.concurrency, queues = excluded.queues, jobs = excluded.jobs,
    processed = excluded.processed;

-- name: drop_stale_workers
DELETE FROM workers WHERE seen_at < :seen_since;

-- name: workers
SELECT * FROM workers ORDER BY started_at, id;

-- name: forget_worker
DELETE FROM workers WHERE id = :id;
