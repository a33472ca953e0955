-- Tenants, their API keys (stored as SHA-256 digests, never in clear) and the
-- job ledger written by the worker's ledger loop.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- first characters of the key, shown to operators to tell keys apart
    prefix      text NOT NULL,
    -- hex SHA-256 of the whole key
    key_hash    text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE jobs (
    id                 uuid PRIMARY KEY,
    tenant_id          uuid NOT NULL,
    pool               text NOT NULL,
    endpoint           text NOT NULL,
    status             text NOT NULL CHECK (status IN ('queued', 'in_progress', 'completed', 'failed', 'cancelled', 'expired')),
    attempts           integer NOT NULL DEFAULT 0,
    upstream_status    integer,
    prompt_tokens      integer,
    completion_tokens  integer,
    total_tokens       integer,
    error_code         text,
    error_message      text,
    request_id         text,
    submitted_at       timestamptz NOT NULL,
    started_at         timestamptz,
    finished_at        timestamptz,
    recorded_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_tenant_submitted ON jobs (tenant_id, submitted_at DESC);
