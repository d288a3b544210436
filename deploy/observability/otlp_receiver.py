#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace receiver for checking the hub's span export.

Decodes every POST with the official OpenTelemetry protobuf definitions
(the `opentelemetry-proto` package: `pip install opentelemetry-proto`) and
writes one JSON object per span to --out (or stdout), one per line:

    {"trace_id": hex, "span_id": hex, "parent_span_id": hex or "",
     "name": str, "kind": "SPAN_KIND_SERVER" | "SPAN_KIND_CLIENT" | ...,
     "start_time_unix_nano": int, "end_time_unix_nano": int,
     "status_code": "STATUS_CODE_OK" | ..., "status_message": str,
     "flags": int, "resource": {attr: value}, "attributes": {attr: value},
     "scope": str}

A request that is not `Content-Type: application/x-protobuf`, or whose
body does not decode, is answered 415 / 400 and written as
{"error": "..."}. Prints `listening=HOST:PORT` once bound (port 0 picks a
free one).

    python3 otlp_receiver.py --listen 127.0.0.1:4318 --out spans.jsonl
    tidemesh-hub serve ... --otlp-endpoint http://127.0.0.1:4318/v1/traces
"""

import argparse
import http.server
import json
import sys
import threading

try:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2
except ImportError:  # pragma: no cover - reported to the caller
    print(
        "missing the opentelemetry-proto package: pip install opentelemetry-proto",
        file=sys.stderr,
    )
    sys.exit(3)

MAX_BODY = 16 << 20


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    x = getattr(v, kind)
    if kind == "array_value":
        return [any_value(e) for e in x.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in x.values}
    if kind == "bytes_value":
        return x.hex()
    return x


def attrs(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def spans_of(req):
    for rs in req.resource_spans:
        resource = attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": trace_pb2.Span.SpanKind.Name(s.kind),
                    "start_time_unix_nano": s.start_time_unix_nano,
                    "end_time_unix_nano": s.end_time_unix_nano,
                    "status_code": trace_pb2.Status.StatusCode.Name(s.status.code),
                    "status_message": s.status.message,
                    "flags": s.flags,
                    "resource": resource,
                    "attributes": attrs(s.attributes),
                    "scope": ss.scope.name,
                }


class Handler(http.server.BaseHTTPRequestHandler):
    out = sys.stdout
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def write(self, obj):
        with self.lock:
            self.out.write(json.dumps(obj, sort_keys=True) + "\n")
            self.out.flush()

    def answer(self, code, body=b"", ctype="application/x-protobuf"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            self.write({"error": "body length %d" % length})
            self.answer(413, b"too large", "text/plain")
            return
        body = self.rfile.read(length)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype != "application/x-protobuf":
            self.write({"error": "content type %r" % ctype})
            self.answer(415, b"want application/x-protobuf", "text/plain")
            return
        req = trace_service_pb2.ExportTraceServiceRequest()
        try:
            req.ParseFromString(body)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported
            self.write({"error": "decode: %s" % e})
            self.answer(400, b"undecodable", "text/plain")
            return
        for span in spans_of(req):
            self.write(span)
        resp = trace_service_pb2.ExportTraceServiceResponse()
        self.answer(200, resp.SerializeToString())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:4318")
    p.add_argument("--out", help="JSON lines file (default: stdout)")
    a = p.parse_args()
    host, _, port = a.listen.rpartition(":")
    if a.out:
        Handler.out = open(a.out, "a", encoding="utf-8")
    srv = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    print("listening=%s:%d" % srv.server_address[:2], flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
