"""The CSV import runs on a real Celery worker against a real Redis."""

import time
from datetime import timedelta

import pytest

from devices import services
from devices.models import Device, ImportJob


@pytest.mark.integration
def test_import_job_is_executed_by_a_real_worker(transactional_db, celery_worker, user_with_role):
    operator = user_with_role("operator")
    job = services.import_job_create(
        actor=operator, filename="batch.csv", content="client_id,name\ndevice-w1,one\ndevice-w2,two\n"
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.done:
            break
        time.sleep(0.1)
    assert job.state == ImportJob.State.SUCCEEDED, celery_worker.log()[-3000:]
    assert set(Device.objects.values_list("client_id", flat=True)) == {"device-w1", "device-w2"}


def _wait_done(job, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.done:
            return job
        time.sleep(0.2)
    return job


@pytest.mark.integration
def test_an_upload_while_the_queue_is_down_is_kept_and_sent_again(
    transactional_db, celery_worker, redis_server, user_with_role
):
    """Redis down at upload: the request still succeeds quickly, the job waits, and the requeue job
    (scheduled every minute by beat) sends it once Redis is back; nothing is lost."""
    operator = user_with_role("operator")
    redis_server.stop(keep_dir=True)
    try:
        started = time.monotonic()
        job = services.import_job_create(actor=operator, filename="late.csv", content="client_id\ndevice-late\n")
        assert time.monotonic() - started < 5, "an unreachable queue must not hang the upload"
        job.refresh_from_db()
        assert job.state == ImportJob.State.PENDING
    finally:
        redis_server.start()
    assert services.import_jobs_requeue(older_than=timedelta(0)) == 1
    assert _wait_done(job).state == ImportJob.State.SUCCEEDED, celery_worker.log()[-3000:]
    assert Device.objects.filter(client_id="device-late").exists()
