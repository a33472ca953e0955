-- Secret rotation: after a new secret is set, deliveries are signed with the
-- new and the previous one until the previous expires, so receivers can
-- switch over without dropping events.

ALTER TABLE webhook_endpoints ADD COLUMN previous_secret text;
ALTER TABLE webhook_endpoints ADD COLUMN previous_expires_at timestamptz;
