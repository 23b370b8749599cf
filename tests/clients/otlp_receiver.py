"""A test OTLP/HTTP receiver: decodes each POST /v1/traces with the official protobuf
definitions (the `opentelemetry-proto` package) and appends every span, as one JSON
line, to a file.

    otlp_receiver.py PORT_FILE SPANS_FILE

Binds a free loopback port, writes it to PORT_FILE, and serves until killed. A body
that does not decode is answered 400 and recorded as {"error": ...}, so a check that
reads SPANS_FILE sees it.
"""

import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

port_file, spans_file = sys.argv[1], sys.argv[2]


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


def record(line):
    with open(spans_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            if self.path != "/v1/traces":
                raise ValueError(f"unexpected path {self.path}")
            if self.headers.get("Content-Type") != "application/x-protobuf":
                raise ValueError(f"unexpected content type {self.headers.get('Content-Type')}")
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
        except Exception as e:  # recorded for the check, answered as a bad request
            record({"error": str(e)})
            self.send_response(400)
            self.end_headers()
            return
        for rs in req.resource_spans:
            resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    record({
                        "service": resource.get("service.name"),
                        "scope": ss.scope.name,
                        "name": s.name,
                        "kind": Span.SpanKind.Name(s.kind),
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "status": Status.StatusCode.Name(s.status.code),
                        "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                    })
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file, "w", encoding="utf-8") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
