-- Asynchronous jobs carry client metadata, and the ledger hears about a job
-- from two streams (outcome events and job-state changes) in no fixed order:
-- a row's status only moves forward.

ALTER TABLE jobs ADD COLUMN metadata jsonb;
ALTER TABLE jobs ADD COLUMN expires_at timestamptz;

CREATE FUNCTION job_status_rank(status text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE status
        WHEN 'queued' THEN 0
        WHEN 'in_progress' THEN 1
        ELSE 2
    END
$$;

CREATE INDEX jobs_tenant_status_submitted ON jobs (tenant_id, status, submitted_at DESC);
