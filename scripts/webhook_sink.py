#!/usr/bin/env python3
"""A webhook receiver for benchmarks and manual checks (docs/webhooks.md).

Verifies every Parley-Signature (the verify() of docs/webhooks.md), keeps events by their
idempotency key (room, epoch, seq), answers 204, and on SIGINT/SIGTERM prints one JSON line:
requests, events, duplicates, gaps, bad signatures, and the delivery lag of each event
(arrival here minus its `ts`) as p50/p99/max in ms.

    python3 scripts/webhook_sink.py --port 8099 --secret "$WEBHOOK_SECRET"
"""
import argparse
import datetime
import hashlib
import hmac
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verify(header: str, raw_body: bytes, secret: str, tolerance_s: int = 300) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(","))
    t = int(parts.get("t", "0"))
    if abs(time.time() - t) > tolerance_s:
        return False
    mac = hmac.new(secret.encode(), f"{t}.".encode() + raw_body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts.get("v1", ""))


class Sink:
    def __init__(self, secret):
        self.secret = secret
        self.lock = threading.Lock()
        self.requests = 0
        self.bad = 0
        self.keys = set()
        self.duplicates = 0
        self.gaps = 0
        self.lags_ms = []


def handler(sink):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            now = time.time()
            ok = verify(self.headers.get("parley-signature", ""), body, sink.secret)
            with sink.lock:
                sink.requests += 1
                if not ok:
                    sink.bad += 1
                else:
                    for event in json.loads(body)["events"]:
                        if event["type"] == "gap":
                            sink.gaps += 1
                            continue
                        key = (event["room"], event["epoch"], event["seq"])
                        if key in sink.keys:
                            sink.duplicates += 1
                            continue
                        sink.keys.add(key)
                        ts = datetime.datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))
                        sink.lags_ms.append((now - ts.timestamp()) * 1000)
            self.send_response(204 if ok else 400)
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    sink = Sink(args.secret)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(sink))

    def stop(*_):
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()
    lags = sorted(sink.lags_ms)
    pick = lambda q: round(lags[min(len(lags) - 1, int(q * len(lags)))], 1) if lags else None
    print(json.dumps({
        "requests": sink.requests, "events": len(sink.keys), "duplicates": sink.duplicates,
        "gaps": sink.gaps, "bad_signatures": sink.bad,
        "lag_ms": {"p50": pick(0.5), "p99": pick(0.99), "max": round(lags[-1], 1) if lags else None},
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
