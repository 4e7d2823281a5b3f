import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleet.settings")

app = Celery("fleet")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


# --- detection: the MQTT consumer as a worker bootstep (`celery -A fleet worker --mqtt-consumer`, or
# DETECTION_CONSUMER_ENABLED). It starts after the pool, so prefork children never inherit its threads.
from celery import bootsteps  # noqa: E402
from click import Option  # noqa: E402

app.user_options["worker"].add(
    Option(
        ("--mqtt-consumer",),
        is_flag=True,
        default=False,
        help="Run the MQTT telemetry consumer and broker-log monitor in this worker (see docs/detection.md).",
    )
)
app.user_options["worker"].add(
    Option(
        ("--mqtt-consumer-replica",),
        type=int,
        default=None,
        help="Which consumer identity this worker uses (1..MQTT_CONSUMER_REPLICAS); replica 1 also runs the monitor.",
    )
)


class MqttConsumerStep(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool"}

    def __init__(self, parent, mqtt_consumer=False, mqtt_consumer_replica=None, **options):
        from django.conf import settings

        super().__init__(parent, **options)
        self.enabled = bool(mqtt_consumer or settings.DETECTION_CONSUMER_ENABLED)
        self.replica = mqtt_consumer_replica
        self.consumer = None

    def start(self, parent):
        from security.detection.consumer import Consumer

        self.consumer = Consumer(replica=self.replica).start()

    def stop(self, parent):
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None


app.steps["worker"].add(MqttConsumerStep)
