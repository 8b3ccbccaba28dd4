"""A minimal OTLP/HTTP sink for measuring tracing overhead: accepts ``POST /v1/traces`` and answers
200 with an empty ``ExportTraceServiceResponse`` (it decodes nothing, so its cost stays off the
gateway's core). Prints how many exports and bytes it took when stopped.

    python -m bench.otlp_sink 4318 &
    make bench BENCH_ARGS="--quick --gateway-env CHITTYCAN_TRACING=true \\
        --gateway-env OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318"
"""

from __future__ import annotations

import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

received = {"exports": 0, "bytes": 0}


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        received["exports"] += 1
        received["bytes"] += length
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's name)
        return


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    server = ThreadingHTTPServer(("127.0.0.1", port), Sink)

    def stop(signum: int, frame: FrameType | None) -> None:
        print(f"otlp sink: {received['exports']} exports, {received['bytes']} bytes", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
