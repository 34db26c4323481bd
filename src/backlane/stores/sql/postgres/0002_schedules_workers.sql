-- backlane PostgreSQL schema, version 2: schedules, paused queues and workers' heartbeats.

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
