-- Upstream calls of a job that timed out or broke off after the request was
-- sent: the provider may have done, and billed, the work without Sluice
-- getting the answer (`upstream.max_unanswered_repeats` bounds how many a
-- job makes). Kept per job so that spend can be reconciled with the
-- provider's bill.
ALTER TABLE jobs ADD COLUMN unanswered_calls integer NOT NULL DEFAULT 0;
