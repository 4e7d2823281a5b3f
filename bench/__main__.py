"""`python -m bench`: runs the benchmarks in a throwaway environment (own var dir, SQLite database, broker port)
and prints each figure against its baseline. Options: --quick (smaller fleets), --compare-iterations N."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

from fleet.ports import free_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10x smaller fleets (a smoke run, not the targets)")
    parser.add_argument(
        "--only",
        choices=["broker", "dashboard", "revocation", "ingest", "rotation", "cluster"],
        action="append",
        help="run only these groups of figures (repeatable); default: all",
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--stall-fleet", type=int, default=10_000)
    parser.add_argument("--connected", type=int, default=2_000)
    parser.add_argument("--reconnect-fleet", type=int, default=10_000)
    parser.add_argument("--ingest-devices", type=int, default=200, help="devices publishing in the ingest runs")
    parser.add_argument("--ingest-messages", type=int, default=500, help="telemetry messages per device per run")
    parser.add_argument("--revocations", type=int, default=200, help="revocations measured one after the other")
    parser.add_argument("--revocation-fleet", type=int, default=10_000)
    parser.add_argument(
        "--revocation-large-fleet", type=int, default=100_000, help="second revocation run at this size (0: skip)"
    )
    parser.add_argument("--revocation-large-count", type=int, default=200)
    parser.add_argument("--rotation-devices", type=int, default=10_000, help="devices rotated (all connected)")
    parser.add_argument("--cluster-devices", type=int, default=2_000, help="connects per round on the RabbitMQ cluster")
    parser.add_argument(
        "--compare-iterations",
        type=int,
        default=0,
        metavar="N",
        help="also reconnect N devices hashed with 101 iterations (mosquitto_passwd's default)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.stall_fleet, args.connected, args.reconnect_fleet = 10_000, 1_000, 200, 1_000
        args.revocations, args.revocation_fleet, args.revocation_large_fleet = 50, 1_000, 10_000
        args.revocation_large_count = 20
        args.rotation_devices = 1_000
        args.cluster_devices = 300

    # Thousands of sockets in this process and in the broker it starts.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max(args.connected, args.reconnect_fleet, args.rotation_devices) + 1000
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))

    workdir = tempfile.mkdtemp(prefix="fleetkeeper-bench-")
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "fleet.settings",
            "FLEET_ENV": "dev",
            "FLEET_VAR_DIR": workdir,
            "DATABASE_URL": f"sqlite:///{workdir}/bench.sqlite3",
            "MQTT_PORT": str(free_port()),
            "MQTT_TLS_PORT": str(free_port()),
            "MQTT_BROKER_DIR": f"{workdir}/mosquitto",
            "LOG_LEVEL": "WARNING",
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    started = time.monotonic()
    call_command("migrate", verbosity=0)
    print(f"Fleetkeeper benchmarks in {workdir} (database ready in {time.monotonic() - started:.1f} s)", flush=True)

    from . import broker, dashboard

    selected = set(args.only or ["broker", "dashboard", "revocation", "ingest", "rotation", "cluster"])
    if "ingest" in selected:  # first: its own devices, its own broker, before the fleets grow
        from . import ingest

        ingest.run(
            devices=args.ingest_devices if not args.quick else min(args.ingest_devices, 50),
            per_device=args.ingest_messages if not args.quick else min(args.ingest_messages, 400),
        )
    if "broker" in selected:
        broker.run(
            devices=args.devices,
            stall_fleet=args.stall_fleet,
            connected=args.connected,
            reconnect_fleet=args.reconnect_fleet,
            compare_iterations=args.compare_iterations,
        )
    if "dashboard" in selected:
        dashboard.run(devices=args.devices)
    if "cluster" in selected:  # its own devices (device-hk...), before revocation decommissions the others
        from . import cluster

        cluster.run(devices=args.cluster_devices)
    if "revocation" in selected:  # last: it decommissions the other benchmarks' devices to size its own fleet
        from . import revocation

        revocation.run(
            fleet=args.revocation_fleet,
            connected=args.connected,
            revocations=args.revocations,
            large_fleet=args.revocation_large_fleet,
            large_revocations=args.revocation_large_count,
        )
    if "rotation" in selected:  # after revocation: it decommissions the other benchmarks' devices too
        from . import rotation

        rotation.run(devices=args.rotation_devices)
    results = broker.RESULTS
    print("\nSummary")
    failed = [r for r in results if r["verdict"] == "FAIL"]
    for r in results:
        print(f"  {r['verdict'] or '    '} {r['name']}: {r['value']:.3f} {r['unit']}")
    if not os.environ.get("FLEET_BENCH_KEEP"):
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
