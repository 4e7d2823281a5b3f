"""Run the MQTT consumer (and, for replica 1, the broker-log monitor) in the foreground, for debugging.

In production it runs inside the Celery workers (`celery -A fleet worker --mqtt-consumer`)."""

import signal
import threading
import time

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Consume device messages (tx/+/telemetry|status|ack on a shared subscription) and the broker log, raising "
        "alerts, until interrupted. Prints the consumer's counters every few seconds."
    )

    def add_arguments(self, parser):
        parser.add_argument("--replica", type=int, default=None, help="consumer identity to use (default: setting)")
        parser.add_argument("--no-monitor", action="store_true", help="do not read the broker log")
        parser.add_argument("--no-detectors", action="store_true", help="ingest only: no rate/size/value rules")
        parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
        parser.add_argument("--report-every", type=float, default=5.0, help="seconds between counter lines")

    def handle(self, *args, **options):
        from security.detection.consumer import Consumer

        consumer = Consumer(
            replica=options["replica"],
            monitor=False if options["no_monitor"] else None,
            detectors=not options["no_detectors"],
        ).start()
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        deadline = time.monotonic() + options["duration"] if options["duration"] else None
        try:
            while True:
                wait = options["report_every"]
                if deadline:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                if done.wait(wait):
                    break
                self.stdout.write(" ".join(f"{k}={v}" for k, v in consumer.stats.as_dict().items()))
                if deadline and time.monotonic() >= deadline:
                    break
        finally:
            consumer.stop()
        self.stdout.write(self.style.SUCCESS(f"stopped: {consumer.stats.as_dict()}"))
