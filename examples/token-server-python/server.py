"""A tiny token backend for parley (Python standard library only).

    PARLEY_JWT_SECRET=... python3 server.py     then   GET http://127.0.0.1:8788/token?user=alice

Your real backend checks its own session first and takes the user from it, never from the
query; this one trusts ?user= to stay a few lines long.
"""
import base64, hashlib, hmac, json, os, re, time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlparse

SECRET = os.environ["PARLEY_JWT_SECRET"].encode()
TTL_S = int(os.environ.get("TOKEN_TTL_S", "600"))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(claims: dict) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64url(json.dumps(claims).encode())
    return head + "." + b64url(hmac.new(SECRET, head.encode(), hashlib.sha256).digest())


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        user = parse_qs(url.query).get("user", [""])[0]
        if url.path != "/token" or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", user):
            return self.answer(404, {"error": "not_found"})
        exp = int(time.time()) + TTL_S
        self.answer(200, {"token": sign({"sub": user, "name": user, "exp": exp}), "exp": exp})

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("access-control-allow-origin", "*")  # the example page is elsewhere
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8788"))), Handler)
print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
server.serve_forever()
