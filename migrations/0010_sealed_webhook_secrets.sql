-- Webhook secrets are sealed at rest (AES-256-GCM under the keyring of
-- `webhooks.secret_keys_file`; core/src/seal.rs): `webhook_endpoints.secret`
-- and `previous_secret` hold `sealed:v1:…` values (workers seal any secret
-- still in clear when they start). A delivery to a tenant's endpoint no
-- longer copies the endpoint's secret: it signs with the endpoint's secrets
-- as they are when it is sent, so a redelivery after a rotation signs with
-- the new secret. `webhook_deliveries.secret` keeps only a per-job
-- webhook's own secret, sealed for its job.
ALTER TABLE webhook_deliveries ALTER COLUMN secret DROP NOT NULL;
UPDATE webhook_deliveries SET secret = NULL WHERE tenant_endpoint;
