"""Queue side: Celery app, job and delivery tasks, job ledger, submission and recovery sweeps."""
