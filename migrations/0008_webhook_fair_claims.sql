-- Claims take due deliveries tenant by tenant (at most a share each).
CREATE INDEX webhook_deliveries_due_by_tenant ON webhook_deliveries (tenant_id, next_attempt_at)
    WHERE status = 'pending';
