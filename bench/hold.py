"""Hold N device connections open in a separate process (`python -m bench.hold PORT START COUNT`).

Devices are other processes in real life; keeping thousands of sockets out of the measuring process also keeps
paho's select()-based loop (limited to descriptors below 1024) working there. Protocol on stdin/stdout: prints
"connected <ok> <refused>", then answers each "check" line with "closed <n>"; exits at EOF."""

import sys

from .broker import client_id, secret_for
from .mqtt_raw import close_all, connect_many, count_closed


def main() -> None:
    port, start, count = (int(v) for v in sys.argv[1:4])
    result = connect_many(port, [(client_id(n), secret_for(n)) for n in range(start, start + count)])
    print(f"connected {result.ok} {result.refused}", flush=True)
    for line in sys.stdin:
        if line.strip() == "check":
            print(f"closed {count_closed(result.sockets)}", flush=True)
    close_all(result.sockets)


if __name__ == "__main__":
    main()
