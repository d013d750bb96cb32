#!/usr/bin/env python3
"""A sample upstream for the demo: answers every request with a page listing what it received,
so you can see what Portcullis forwards (X-Forwarded-*, and later the identity headers)."""
import html
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
            for k, v in self.headers.items()
        )
        body = (
            "<!doctype html><meta charset=utf-8><title>Sample upstream</title>"
            "<h1>Hello from the sample upstream</h1>"
            f"<p>{html.escape(self.command)} {html.escape(self.path)}</p>"
            f"<table border=1>{rows}</table>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    ThreadingHTTPServer((host, port), Echo).serve_forever()
