-- backlane PostgreSQL schema, whole: what a fresh install creates in one step.
-- Applying every numbered migration in turn must give exactly this schema (a test compares
-- the catalogs): a new migration changes this file too.
-- {schema} is the store's schema (quoted), {channel} its notification channel.
-- Times are double precision POSIX seconds (UTC), as the Job record holds them; payload and
-- result are JSON text kept verbatim; error, meta and attempt_history are jsonb; seq gives
-- enqueue order.

CREATE TABLE {schema}.jobs (
    id               text             PRIMARY KEY,
    seq              bigint           GENERATED ALWAYS AS IDENTITY,
    task             text             NOT NULL,
    payload          text             NOT NULL,
    queue            text             NOT NULL,
    priority         integer          NOT NULL DEFAULT 0,
    state            text             NOT NULL,
    "key"            text,
    attempts         integer          NOT NULL DEFAULT 0,
    run_at           double precision NOT NULL,
    created_at       double precision NOT NULL,
    started_at       double precision,
    finished_at      double precision,
    lease_until      double precision,
    worker_id        text,
    progress         double precision,
    message          text,
    result           text,
    error            jsonb,
    "after"          text,
    cancel_requested boolean          NOT NULL DEFAULT false,
    release_at       double precision,
    keep_until       double precision,
    meta             jsonb            NOT NULL DEFAULT '{}',
    attempt_history  jsonb,
    CONSTRAINT jobs_state_known CHECK (state IN ('deferred', 'queued', 'running', 'succeeded',
                                                 'failed', 'cancelled', 'discarded'))
);

-- A queue table churns: vacuum it after 2% of its rows changed, not the default 20%, so
-- that a million finished rows do not let dead claimable entries pile up for long.
ALTER TABLE {schema}.jobs SET (autovacuum_vacuum_scale_factor = 0.02,
                               autovacuum_analyze_scale_factor = 0.02);

-- claim from given queues: only claimable rows, already in claim order. It orders by
-- -priority rather than priority DESC so that only the per-queue claim, which orders the
-- same way, can read it in order: the planner never serves that claim from
-- jobs_claimable_any, which would walk past every other queue's backlog. A bigint, as the
-- lowest integer has no negation among integers.
CREATE INDEX jobs_claimable ON {schema}.jobs (queue, (-priority::bigint), run_at, seq)
    WHERE state = 'queued' AND "after" IS NULL;

-- claim from any queue.
CREATE INDEX jobs_claimable_any ON {schema}.jobs (priority DESC, run_at, seq)
    WHERE state = 'queued' AND "after" IS NULL;

-- freeing the successors of a job that ends.
CREATE INDEX jobs_after ON {schema}.jobs ("after") WHERE "after" IS NOT NULL;

-- an idempotency key is held by one active job at most.
CREATE UNIQUE INDEX jobs_active_key ON {schema}.jobs ("key")
    WHERE "key" IS NOT NULL AND state IN ('deferred', 'queued', 'running');

-- requeue_expired: leases of running jobs, release deadlines of deferred ones.
CREATE INDEX jobs_lease ON {schema}.jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_release ON {schema}.jobs (release_at)
    WHERE state = 'deferred' AND release_at IS NOT NULL;

-- purge by retention, and by end state and end time (also stats).
CREATE INDEX jobs_keep_until ON {schema}.jobs (keep_until) WHERE keep_until IS NOT NULL;
CREATE INDEX jobs_finished ON {schema}.jobs (state, finished_at) WHERE finished_at IS NOT NULL;

-- list_jobs, newest first, unfiltered or by state; counts per queue and state.
CREATE INDEX jobs_created ON {schema}.jobs (created_at DESC, seq DESC);
CREATE INDEX jobs_state_created ON {schema}.jobs (state, created_at DESC, seq DESC);
CREATE INDEX jobs_queue_state ON {schema}.jobs (queue, state);

-- Announce work: after any statement that left a job claimable or queued to run later,
-- notify the channel given as the trigger's argument; the payload is empty when one is
-- due already (by the server's clock), else the earliest time one becomes due, so that a
-- waiting worker waits until then rather than for its next poll. Inside a transaction the
-- notification is delivered at commit, and never on rollback, so a job enqueued through
-- a caller's transaction wakes workers only once it exists.
CREATE FUNCTION {schema}.announce_work() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    due double precision;
BEGIN
    SELECT min(run_at) INTO due FROM changed WHERE state = 'queued' AND "after" IS NULL;
    IF due <= extract(epoch FROM clock_timestamp()) THEN
        PERFORM pg_notify(TG_ARGV[0], '');
    ELSIF due IS NOT NULL THEN
        PERFORM pg_notify(TG_ARGV[0], due::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_announce_inserted AFTER INSERT ON {schema}.jobs
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.announce_work('{channel}');

CREATE TRIGGER jobs_announce_updated AFTER UPDATE ON {schema}.jobs
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.announce_work('{channel}');

-- The latest slot each schedule took (claim_slot) and whether it is paused.
CREATE TABLE {schema}.schedules (
    name      text             PRIMARY KEY,
    last_slot double precision,
    paused    boolean          NOT NULL DEFAULT false
);

-- Queues claim takes nothing from.
CREATE TABLE {schema}.paused_queues (
    queue text PRIMARY KEY
);

-- Each worker as its last heartbeat described it (queues NULL: every queue).
CREATE TABLE {schema}.workers (
    id          text             PRIMARY KEY,
    started_at  double precision NOT NULL,
    seen_at     double precision NOT NULL,
    concurrency integer          NOT NULL,
    queues      text[],
    jobs        text[]           NOT NULL DEFAULT '{}',
    processed   bigint           NOT NULL DEFAULT 0
);
