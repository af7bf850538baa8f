"""The dispatcher: claims due deliveries in batches, publishes one Celery task per batch, and
reconciles leases that ran out."""
