-- The statements of backlane's SQLite store, one per "-- name:" block.
-- Lists of ids come as one JSON array parameter, read with json_each.
-- The hot statements name their index (INDEXED BY): their plan must not depend on the
-- planner's statistics, and a missing index is an error rather than a slow table scan.

-- name: insert_job
-- Stores one job unless an active job holds its key; returns seq only when stored.
INSERT INTO jobs (id, task, payload, queue, priority, state, "key", attempts, run_at,
                  created_at, started_at, finished_at, lease_until, worker_id, progress,
                  message, result, error, "after", cancel_requested, release_at,
                  keep_until, meta)
VALUES (:id, :task, :payload, :queue, :priority, :state, :key, :attempts, :run_at,
        :created_at, :started_at, :finished_at, :lease_until, :worker_id, :progress,
        :message, :result, :error, :after, :cancel_requested, :release_at,
        :keep_until, :meta)
ON CONFLICT ("key") WHERE "key" IS NOT NULL AND state IN ('deferred', 'queued', 'running')
DO NOTHING
RETURNING seq;

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: get_key_holder
SELECT * FROM jobs
WHERE "key" = :key AND state IN ('deferred', 'queued', 'running');

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

-- name: claim_any
UPDATE jobs
SET state = 'running', attempts = attempts + 1, started_at = :now,
    lease_until = :lease_until, worker_id = :worker_id
WHERE seq IN (
    SELECT seq FROM jobs INDEXED BY jobs_claimable_any
    WHERE state = 'queued' AND "after" IS NULL AND run_at <= :now
    ORDER BY priority DESC, run_at, seq
    LIMIT :limit
)
RETURNING *;

-- name: claim_queue
UPDATE jobs
SET state = 'running', attempts = attempts + 1, started_at = :now,
    lease_until = :lease_until, worker_id = :worker_id
WHERE seq IN (
    SELECT seq FROM jobs INDEXED BY jobs_claimable
    WHERE state = 'queued' AND "after" IS NULL AND run_at <= :now AND queue = :queue
    ORDER BY priority DESC, run_at, seq
    LIMIT :limit
)
RETURNING *;

-- name: claim_queues
UPDATE jobs
SET state = 'running', attempts = attempts + 1, started_at = :now,
    lease_until = :lease_until, worker_id = :worker_id
WHERE seq IN (
    SELECT seq FROM jobs INDEXED BY jobs_claimable
    WHERE state = 'queued' AND "after" IS NULL AND run_at <= :now
      AND queue IN (SELECT value FROM json_each(:queues))
    ORDER BY priority DESC, run_at, seq
    LIMIT :limit
)
RETURNING *;

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

-- name: hand_back
UPDATE jobs INDEXED BY jobs_id
SET state = 'queued', lease_until = NULL, worker_id = NULL,
    attempts = MAX(attempts - 1, 0)
WHERE state = 'running' AND worker_id = :worker_id
  AND id IN (SELECT value FROM json_each(:ids));

-- name: cancel_expired_leases
-- Running jobs asked to stop whose worker stopped answering end cancelled, not queued.
UPDATE jobs INDEXED BY jobs_lease
SET state = 'cancelled', lease_until = NULL, finished_at = :now, keep_until = :keep_until
WHERE state = 'running' AND lease_until < :now AND cancel_requested = 1
RETURNING id;

-- name: requeue_expired_leases
UPDATE jobs INDEXED BY jobs_lease SET state = 'queued', lease_until = NULL, worker_id = NULL
WHERE state = 'running' AND lease_until < :now AND cancel_requested = 0;

-- name: requeue_overdue_deferred
UPDATE jobs INDEXED BY jobs_release SET state = 'queued'
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

-- name: counts
SELECT queue, state, COUNT(*) AS n FROM jobs GROUP BY queue, state;
