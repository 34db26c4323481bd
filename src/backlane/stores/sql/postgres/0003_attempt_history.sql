-- backlane PostgreSQL schema, version 3: the history of a job's attempts.
-- {schema} is the store's schema (quoted).

-- The records of the attempts that ended without succeeding, a JSON array appended to by
-- finish (NULL: none).
ALTER TABLE {schema}.jobs ADD COLUMN attempt_history jsonb;
