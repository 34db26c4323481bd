-- backlane PostgreSQL schema, version 5: jobs_claimable orders by -priority as a bigint, so
-- that the lowest priority tasks accept (-2147483648, whose negation is no integer) can
-- be stored: versions 1 to 4 refused such a job with "integer out of range".

DROP INDEX {schema}.jobs_claimable;
CREATE INDEX jobs_claimable ON {schema}.jobs (queue, (-priority::bigint), run_at, seq)
    WHERE state = 'queued' AND "after" IS NULL;
