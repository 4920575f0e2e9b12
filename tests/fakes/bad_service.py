"""A stand-in service that misbehaves, for the benchmark's failure handling.

python tests/fakes/bad_service.py --behaviour wrong-label|dead --host 127.0.0.1 --port P
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self._answer(200, {"status": "ok"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        labels = ["tornado"] + [f"label-{i}" for i in range(10)]
        self._answer(
            200,
            {
                "prediction": "tornado",
                "probability": 1.0,
                "probabilities": {label: float(label == "tornado") for label in labels},
            },
        )

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--behaviour", choices=("wrong-label", "dead"), required=True)
    args = parser.parse_args()
    if args.behaviour == "dead":
        print("refusing to start", file=sys.stderr)
        return 3
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    sys.exit(main())
