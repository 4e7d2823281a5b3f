from celery import shared_task

from security.audit import audit_context

from . import services


@shared_task(name="devices.import_devices_csv", acks_late=True)
def import_devices_csv(job_id: int) -> str:
    """Idempotent (a finished job is left alone), so late acknowledgement is safe."""
    with audit_context(service="import"):
        return services.import_job_run(job_id=job_id).state


@shared_task(name="devices.requeue_pending_imports")
def requeue_pending_imports() -> int:
    return services.import_jobs_requeue()
