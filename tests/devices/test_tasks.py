"""The CSV import runs on a real Celery worker against a real Redis."""

import time

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
