-- backlane PostgreSQL schema, version 4: work is announced with when it becomes due, also
-- for jobs queued to run later (version 1 announced only jobs due within a second), so
-- that a waiting worker starts a delayed job or a retry on time, whatever its poll.

CREATE OR REPLACE FUNCTION {schema}.announce_work() RETURNS trigger
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
