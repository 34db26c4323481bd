-- The statements of backlane's PostgreSQL store, one per "-- name:" block.
-- {schema} is the store's schema (quoted); parameters are psycopg's %(name)s. Lists come as
-- arrays. Each statement is one atomic step unless the store wraps several in a
-- transaction; statements that end jobs free their successors in the same statement.

-- name: migrations_table
CREATE TABLE IF NOT EXISTS {schema}.migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: schema_version
SELECT max(version) AS version FROM {schema}.migrations;

-- name: record_migration
INSERT INTO {schema}.migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: insert_jobs
-- Stores a batch of jobs that hold no key, in batch order. "after" naming a job stored
-- earlier in the batch is kept; naming another job, it is kept only while that job is
-- active (nothing to wait for otherwise).
INSERT INTO {schema}.jobs AS j (id, task, payload, queue, priority, state, attempts, run_at,
    created_at, started_at, finished_at, lease_until, worker_id, progress, message, result,
    error, "after", cancel_requested, release_at, keep_until, meta, attempt_history)
SELECT b.id, b.task, b.payload, b.queue, b.priority, b.state, b.attempts, b.run_at,
       b.created_at, b.started_at, b.finished_at, b.lease_until, b.worker_id, b.progress,
       b.message, b.result, b.error::jsonb,
       CASE
           WHEN b.after_in_batch THEN b."after"
           WHEN EXISTS (SELECT 1 FROM {schema}.jobs a
                        WHERE a.id = b."after" AND a.state IN ('deferred', 'queued', 'running'))
           THEN b."after"
       END,
       b.cancel_requested, b.release_at, b.keep_until, b.meta::jsonb,
       b.attempt_history::jsonb
FROM unnest(%(id)s::text[], %(task)s::text[], %(payload)s::text[], %(queue)s::text[],
            %(priority)s::integer[], %(state)s::text[], %(attempts)s::integer[],
            %(run_at)s::float8[], %(created_at)s::float8[], %(started_at)s::float8[],
            %(finished_at)s::float8[], %(lease_until)s::float8[], %(worker_id)s::text[],
            %(progress)s::float8[], %(message)s::text[], %(result)s::text[],
            %(error)s::text[], %(after)s::text[], %(after_in_batch)s::boolean[],
            %(cancel_requested)s::boolean[], %(release_at)s::float8[],
            %(keep_until)s::float8[], %(meta)s::text[], %(attempt_history)s::text[])
     WITH ORDINALITY AS b(id, task, payload, queue, priority, state, attempts, run_at,
                          created_at, started_at, finished_at, lease_until, worker_id,
                          progress, message, result, error, "after", after_in_batch,
                          cancel_requested, release_at, keep_until, meta, attempt_history,
                          ord)
ORDER BY b.ord
RETURNING j.id, j."after";

-- name: insert_job
-- Stores one job unless an active job holds its key; returns id and "after" only when
-- stored. "after" is kept only while the job it names is active.
INSERT INTO {schema}.jobs (id, task, payload, queue, priority, state, "key", attempts, run_at,
    created_at, started_at, finished_at, lease_until, worker_id, progress, message, result,
    error, "after", cancel_requested, release_at, keep_until, meta, attempt_history)
VALUES (%(id)s, %(task)s, %(payload)s, %(queue)s, %(priority)s, %(state)s, %(key)s,
        %(attempts)s, %(run_at)s, %(created_at)s, %(started_at)s, %(finished_at)s,
        %(lease_until)s, %(worker_id)s, %(progress)s, %(message)s, %(result)s,
        %(error)s::jsonb,
        (SELECT a.id FROM {schema}.jobs a
         WHERE a.id = %(after)s AND a.state IN ('deferred', 'queued', 'running')),
        %(cancel_requested)s, %(release_at)s, %(keep_until)s, %(meta)s::jsonb,
        %(attempt_history)s::jsonb)
ON CONFLICT ("key") WHERE "key" IS NOT NULL AND state IN ('deferred', 'queued', 'running')
DO NOTHING
RETURNING id, "after";

-- name: key_holder
SELECT * FROM {schema}.jobs
WHERE "key" = %(key)s AND state IN ('deferred', 'queued', 'running');

-- name: get_job
SELECT * FROM {schema}.jobs WHERE id = %(id)s;

-- name: release
UPDATE {schema}.jobs SET state = 'queued'
WHERE id = ANY(%(ids)s::text[]) AND state = 'deferred';

-- name: discard
WITH ended AS (
    UPDATE {schema}.jobs
    SET state = 'discarded', finished_at = %(now)s, keep_until = %(keep_until)s
    WHERE id = ANY(%(ids)s::text[]) AND state = 'deferred'
    RETURNING id
)
UPDATE {schema}.jobs w SET "after" = NULL
FROM ended e
WHERE w."after" = e.id AND w.id <> ALL(%(ids)s::text[]);

-- name: claim_any
-- The best claimable jobs of any queue not paused, skipping rows other claimers hold. The
-- ids are picked by an uncorrelated sub-select (evaluated once, reading jobs_claimable_any
-- in claim order and stopping at the limit) and the rows updated through the primary key:
-- a plan that cannot turn into a sort of the whole backlog, whatever the statistics say.
UPDATE {schema}.jobs j
SET state = 'running', attempts = j.attempts + 1, started_at = %(now)s,
    lease_until = %(lease_until)s, worker_id = %(worker_id)s
WHERE j.id = ANY (ARRAY(
    SELECT c.id FROM {schema}.jobs c
    WHERE c.state = 'queued' AND c."after" IS NULL AND c.run_at <= %(now)s
      AND c.queue <> ALL (ARRAY(SELECT p.queue FROM {schema}.paused_queues p))
    ORDER BY c.priority DESC, c.run_at, c.seq
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
))
RETURNING j.*;

-- name: claim_queues
-- The best claimable jobs of the given queues not paused: the best few of each queue (an
-- ordered scan of jobs_claimable per queue, skipping rows other claimers hold), then the
-- best of those; rows updated through the primary key.
UPDATE {schema}.jobs j
SET state = 'running', attempts = j.attempts + 1, started_at = %(now)s,
    lease_until = %(lease_until)s, worker_id = %(worker_id)s
WHERE j.id = ANY (ARRAY(
    SELECT c.id
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at, seq FROM {schema}.jobs
        WHERE queue = q.name AND state = 'queued' AND "after" IS NULL
          AND run_at <= %(now)s
        ORDER BY -priority::bigint, run_at, seq  -- jobs_claimable's order
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) c
    WHERE q.name <> ALL (ARRAY(SELECT p.queue FROM {schema}.paused_queues p))
    ORDER BY c.priority DESC, c.run_at, c.seq
    LIMIT %(limit)s
))
RETURNING j.*;

-- name: next_due_any
-- When the earliest job of the queues not paused that is queued to run later (after a
-- time) becomes due; NULL: none. Reads jobs_claimable_any, a few entries per priority in
-- use: the priorities one after the other (each the first entry below the last), then the
-- first entry of each past the time.
WITH RECURSIVE level(priority) AS (
    (SELECT n.priority FROM {schema}.jobs n
     WHERE n.state = 'queued' AND n."after" IS NULL
     ORDER BY n.priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT n.priority FROM {schema}.jobs n
            WHERE n.state = 'queued' AND n."after" IS NULL AND n.priority < l.priority
            ORDER BY n.priority DESC LIMIT 1)
    FROM level l WHERE l.priority IS NOT NULL
)
SELECT min((SELECT d.run_at FROM {schema}.jobs d
            WHERE d.state = 'queued' AND d."after" IS NULL AND d.priority = l.priority
              AND d.run_at > %(now)s
              AND d.queue <> ALL (ARRAY(SELECT p.queue FROM {schema}.paused_queues p))
            ORDER BY d.run_at LIMIT 1)) AS next_due
FROM level l WHERE l.priority IS NOT NULL;

-- name: next_due_queues
-- next_due_any for the given queues, read from jobs_claimable: per queue, its priorities
-- one after the other, then the first entry of each past the time.
WITH RECURSIVE level(queue, rank) AS (
    SELECT q.name, (SELECT -n.priority::bigint FROM {schema}.jobs n
                    WHERE n.queue = q.name AND n.state = 'queued' AND n."after" IS NULL
                    ORDER BY -n.priority::bigint LIMIT 1)
    FROM unnest(%(queues)s::text[]) AS q(name)
    WHERE q.name <> ALL (ARRAY(SELECT p.queue FROM {schema}.paused_queues p))
    UNION ALL
    SELECT l.queue, (SELECT -n.priority::bigint FROM {schema}.jobs n
                     WHERE n.queue = l.queue AND n.state = 'queued' AND n."after" IS NULL
                       AND -n.priority::bigint > l.rank
                     ORDER BY -n.priority::bigint LIMIT 1)
    FROM level l WHERE l.rank IS NOT NULL
)
SELECT min((SELECT d.run_at FROM {schema}.jobs d
            WHERE d.queue = l.queue AND d.state = 'queued' AND d."after" IS NULL
              AND -d.priority::bigint = l.rank AND d.run_at > %(now)s
            ORDER BY d.run_at LIMIT 1)) AS next_due
FROM level l WHERE l.rank IS NOT NULL;

-- name: renew_leases
UPDATE {schema}.jobs SET lease_until = %(lease_until)s
WHERE id = ANY(%(ids)s::text[]) AND state = 'running' AND worker_id = %(worker_id)s
RETURNING id, cancel_requested;

-- name: finish
-- Applies, for each job, the first outcome given by the worker holding it; frees the
-- successors of the jobs it ends, and appends the attempt's record (if given) to the
-- job's history. Returns the ids applied with their place in the batch.
WITH given AS (
    SELECT * FROM unnest(%(id)s::text[], %(worker_id)s::text[], %(state)s::text[],
                         %(finished_at)s::float8[], %(result)s::text[], %(error)s::text[],
                         %(run_at)s::float8[], %(keep_until)s::float8[],
                         %(attempt)s::text[])
        WITH ORDINALITY AS o(id, worker_id, state, finished_at, result, error, run_at,
                             keep_until, attempt, ord)
), applied AS (
    SELECT DISTINCT ON (o.id) o.*
    FROM given o
    JOIN {schema}.jobs j ON j.id = o.id AND j.state = 'running' AND j.worker_id = o.worker_id
    ORDER BY o.id, o.ord
), done AS (
    UPDATE {schema}.jobs j
    SET state = a.state,
        lease_until = NULL,
        result = a.result,
        error = a.error::jsonb,
        worker_id = CASE WHEN a.state = 'queued' THEN NULL ELSE j.worker_id END,
        run_at = CASE WHEN a.state = 'queued' THEN coalesce(a.run_at, j.run_at)
                      ELSE j.run_at END,
        finished_at = CASE WHEN a.state = 'queued' THEN j.finished_at ELSE a.finished_at END,
        keep_until = CASE WHEN a.state = 'queued' THEN j.keep_until ELSE a.keep_until END,
        attempt_history = CASE WHEN a.attempt IS NULL THEN j.attempt_history
                               ELSE coalesce(j.attempt_history, '[]'::jsonb)
                                    || jsonb_build_array(a.attempt::jsonb) END
    FROM applied a
    WHERE j.id = a.id AND j.state = 'running' AND j.worker_id = a.worker_id
    RETURNING j.id, j.state, a.ord
), freed AS (
    UPDATE {schema}.jobs w SET "after" = NULL
    FROM done d
    WHERE w."after" = d.id AND d.state <> 'queued'
)
SELECT id, ord FROM done ORDER BY ord;

-- name: hand_back
UPDATE {schema}.jobs
SET state = 'queued', lease_until = NULL, worker_id = NULL,
    attempts = greatest(attempts - 1, 0)
WHERE id = ANY(%(ids)s::text[]) AND state = 'running' AND worker_id = %(worker_id)s;

-- name: cancel_expired_leases
-- Running jobs asked to stop whose worker stopped answering end cancelled, not queued.
-- Rows another session is changing are left for the next sweep.
WITH ended AS (
    UPDATE {schema}.jobs
    SET state = 'cancelled', lease_until = NULL, finished_at = %(now)s,
        keep_until = %(keep_until)s
    WHERE id IN (SELECT id FROM {schema}.jobs
                 WHERE state = 'running' AND lease_until < %(now)s AND cancel_requested
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
), freed AS (
    UPDATE {schema}.jobs w SET "after" = NULL
    FROM ended e
    WHERE w."after" = e.id
)
SELECT count(*) AS n FROM ended;

-- name: requeue_expired_leases
WITH requeued AS (
    UPDATE {schema}.jobs SET state = 'queued', lease_until = NULL, worker_id = NULL
    WHERE id IN (SELECT id FROM {schema}.jobs
                 WHERE state = 'running' AND lease_until < %(now)s AND NOT cancel_requested
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
)
SELECT count(*) AS n FROM requeued;

-- name: requeue_overdue_deferred
WITH requeued AS (
    UPDATE {schema}.jobs SET state = 'queued'
    WHERE id IN (SELECT id FROM {schema}.jobs
                 WHERE state = 'deferred' AND release_at IS NOT NULL
                   AND release_at <= %(now)s
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
)
SELECT count(*) AS n FROM requeued;

-- name: lock_job
SELECT state, "key", "after" FROM {schema}.jobs WHERE id = %(id)s FOR UPDATE;

-- name: cancel_waiting
WITH ended AS (
    UPDATE {schema}.jobs SET state = 'cancelled', finished_at = %(now)s,
                             keep_until = %(keep_until)s
    WHERE id = %(id)s AND state IN ('deferred', 'queued')
    RETURNING id
)
UPDATE {schema}.jobs w SET "after" = NULL
FROM ended e
WHERE w."after" = e.id;

-- name: request_cancel
UPDATE {schema}.jobs SET cancel_requested = true WHERE id = %(id)s AND state = 'running';

-- name: retry
-- Queues a failed or cancelled job again; "after" is kept only while the job it names is
-- active. Fails on jobs_active_key when another active job holds the key.
UPDATE {schema}.jobs
SET state = 'queued', run_at = %(now)s, finished_at = NULL, keep_until = NULL,
    lease_until = NULL, worker_id = NULL, result = NULL, cancel_requested = false,
    "after" = (SELECT a.id FROM {schema}.jobs a
               WHERE a.id = jobs."after" AND a.state IN ('deferred', 'queued', 'running'))
WHERE id = %(id)s AND state IN ('failed', 'cancelled');

-- name: set_progress
UPDATE {schema}.jobs SET progress = %(progress)s, message = %(message)s
WHERE id = %(id)s AND state = 'running' AND worker_id = %(worker_id)s;

-- name: delete
WITH gone AS (
    DELETE FROM {schema}.jobs WHERE id = ANY(%(ids)s::text[]) RETURNING id
), freed AS (
    UPDATE {schema}.jobs w SET "after" = NULL
    FROM gone g
    WHERE w."after" = g.id AND w.id <> ALL(%(ids)s::text[])
)
SELECT count(*) AS n FROM gone;

-- name: purge_kept
-- One batch of ended jobs past their retention, removed with the successors they held
-- freed; rows another session holds are left for the next batch.
WITH doomed AS (
    SELECT id FROM {schema}.jobs
    WHERE keep_until < %(before)s
      AND state IN ('succeeded', 'failed', 'cancelled', 'discarded')
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {schema}.jobs j USING doomed d WHERE j.id = d.id RETURNING j.id
), freed AS (
    UPDATE {schema}.jobs w SET "after" = NULL
    FROM gone g
    WHERE w."after" = g.id AND w.id NOT IN (SELECT id FROM doomed)
)
SELECT count(*) AS n FROM gone;

-- name: purge_finished
-- One batch of jobs that ended in one of the given states before a time.
WITH doomed AS (
    SELECT id FROM {schema}.jobs
    WHERE state = ANY(%(states)s::text[]) AND finished_at < %(before)s
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {schema}.jobs j USING doomed d WHERE j.id = d.id RETURNING j.id
), freed AS (
    UPDATE {schema}.jobs w SET "after" = NULL
    FROM gone g
    WHERE w."after" = g.id AND w.id NOT IN (SELECT id FROM doomed)
)
SELECT count(*) AS n FROM gone;

-- name: text_matches
-- list_jobs' text filter: a case-insensitive substring of the id, task, arguments or
-- error message (strpos takes the text literally: no wildcards to escape).
(strpos(lower(id), lower(%(text)s)) > 0
 OR strpos(lower(task), lower(%(text)s)) > 0
 OR strpos(lower(payload), lower(%(text)s)) > 0
 OR strpos(lower(error ->> 'message'), lower(%(text)s)) > 0)

-- name: text_matches_ascii
-- text_matches for an ASCII text, given in lower case: the C collation folds ASCII letters
-- only, several times faster than the database's own rules (which would, beyond ASCII,
-- also let a Kelvin sign match a "k").
(strpos(lower(id COLLATE "C"), %(folded)s) > 0
 OR strpos(lower(task COLLATE "C"), %(folded)s) > 0
 OR strpos(lower(payload COLLATE "C"), %(folded)s) > 0
 OR strpos(lower((error ->> 'message') COLLATE "C"), %(folded)s) > 0)

-- name: counts
SELECT queue, state, count(*) AS n FROM {schema}.jobs GROUP BY queue, state;

-- name: stats
-- Jobs that ended since a time, per bucket of a width: the number of widths since the
-- epoch, rounded down. A wait counts only for a last attempt that started at or after
-- its run_at.
SELECT floor(finished_at / %(width)s)::bigint AS bucket,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
       coalesce(sum(started_at - run_at) FILTER (WHERE started_at >= run_at), 0.0)
           AS wait_total,
       count(*) FILTER (WHERE started_at >= run_at) AS wait_count
FROM {schema}.jobs
WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= %(since)s
GROUP BY bucket
ORDER BY bucket;

-- name: take_slot
-- Records a slot as the schedule's latest unless it or a later one was taken; returns the
-- name only when the slot was taken now.
INSERT INTO {schema}.schedules AS s (name, last_slot) VALUES (%(name)s, %(slot)s)
ON CONFLICT (name) DO UPDATE SET last_slot = excluded.last_slot
WHERE s.last_slot IS NULL OR s.last_slot < excluded.last_slot
RETURNING name;

-- name: schedules
SELECT name, last_slot, paused FROM {schema}.schedules ORDER BY name;

-- name: pause_schedule
INSERT INTO {schema}.schedules AS s (name, paused) VALUES (%(name)s, %(paused)s)
ON CONFLICT (name) DO UPDATE SET paused = excluded.paused;

-- name: pause_queue
INSERT INTO {schema}.paused_queues (queue) VALUES (%(queue)s) ON CONFLICT (queue) DO NOTHING;

-- name: resume_queue
DELETE FROM {schema}.paused_queues WHERE queue = %(queue)s;

-- name: paused_queues
SELECT queue FROM {schema}.paused_queues;

-- name: beat
INSERT INTO {schema}.workers AS w (id, started_at, seen_at, concurrency, queues, jobs,
                                   processed)
VALUES (%(id)s, %(started_at)s, %(seen_at)s, %(concurrency)s, %(queues)s::text[],
        %(jobs)s::text[], %(processed)s)
ON CONFLICT (id) DO UPDATE SET
    started_at = excluded.started_at, seen_at = excluded.seen_at,
    concurrency = excluded.concurrency, queues = excluded.queues, jobs = excluded.jobs,
    processed = excluded.processed;

-- name: workers
-- Drops the records not seen since a time and returns the others, oldest started first.
WITH stale AS (
    DELETE FROM {schema}.workers WHERE seen_at < %(seen_since)s
)
SELECT * FROM {schema}.workers WHERE seen_at >= %(seen_since)s ORDER BY started_at, id;

-- name: forget_worker
DELETE FROM {schema}.workers WHERE id = %(id)s;
