-- Job events the ledger could not store (Postgres refused the row for its
-- data, not for an outage): kept here with the error, so that one bad row
-- never holds the rest of its batch and is not lost either. The event is
-- kept as JSON text, which holds what a jsonb column refuses.
CREATE TABLE ledger_dead_letters (
    id          bigserial PRIMARY KEY,
    job_id      uuid NOT NULL,
    tenant_id   uuid NOT NULL,
    event       text NOT NULL,
    error       text NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_dead_letters_job ON ledger_dead_letters (job_id);
