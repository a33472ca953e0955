-- Per-tenant scheduling and admission settings. NULL takes the `[tenants]`
-- default of the configuration; 0 for a limit means no limit.

ALTER TABLE tenants
    ADD COLUMN weight      integer CHECK (weight BETWEEN 1 AND 1000),
    ADD COLUMN tier        text    CHECK (tier IN ('interactive', 'normal', 'batch')),
    ADD COLUMN max_queued  bigint  CHECK (max_queued >= 0),
    ADD COLUMN rpm         bigint  CHECK (rpm >= 0),
    ADD COLUMN tpm         bigint  CHECK (tpm >= 0),
    ADD COLUMN updated_at  timestamptz NOT NULL DEFAULT now();
