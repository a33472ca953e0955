-- A tenant's cap on jobs running at once, over all workers. NULL takes the
-- `[tenants]` default of the configuration; 0 means no limit.

ALTER TABLE tenants ADD COLUMN max_in_flight bigint CHECK (max_in_flight >= 0);
