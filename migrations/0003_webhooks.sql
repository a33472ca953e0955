-- Webhooks: a default endpoint per tenant, one delivery per job event (its
-- id is the `webhook-id` of every attempt), and every attempt recorded.

CREATE TABLE webhook_endpoints (
    tenant_id    uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    url          text NOT NULL,
    -- `whsec_…`; needed in clear to sign, so kept out of logs and API answers
    secret       text NOT NULL,
    disabled_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    id               text PRIMARY KEY,
    job_id           uuid NOT NULL,
    tenant_id        uuid NOT NULL,
    event_type       text NOT NULL,
    url              text NOT NULL,
    secret           text NOT NULL,
    -- true when the target is the tenant's default endpoint (a 410 disables it)
    tenant_endpoint  boolean NOT NULL,
    payload          text NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed', 'gone')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status      integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);

CREATE TABLE webhook_attempts (
    id               bigserial PRIMARY KEY,
    delivery_id      text NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt          integer NOT NULL,
    response_status  integer,
    error            text,
    latency_ms       integer NOT NULL,
    attempted_at     timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz
);

CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);
