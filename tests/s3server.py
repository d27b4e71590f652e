"""A real S3-protocol server on 127.0.0.1 for tests (moto's server mode), behind a small proxy that counts and breaks.

`with S3Server() as s3:` starts moto's ThreadedMotoServer and, in front of it, a plain HTTP proxy on another port:
`s3.env` points botocore and s3fs at the proxy (AWS_ENDPOINT_URL, test credentials, no instance metadata). The proxy
forwards every request unchanged (moto does not check signatures) and logs the bytes each GET of a weight file
returned; `faults` breaks the next range GETs of weight files ("503", "drop": half the answer then the connection
closed, "stall": STALL seconds of silence), `corrupt` flips one byte of a file as served, and `on_range(key, start)`
runs before each range answer (e.g. to re-upload a file mid-run with boto3).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class S3Server:
    def __init__(self):
        self.log: list[tuple[str, int, int]] = []      # (key, start, bytes) of each GET of a .safetensors file
        self.faults: list[str] = []
        self.stall = 5.0
        self.corrupt: dict[str, int] = {}               # key -> offset of a byte served flipped
        self.on_range = None
        self._lock = threading.Lock()

    def __enter__(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.moto = ThreadedMotoServer(port=0, ip_address="127.0.0.1", verbose=False)
        self.moto.start()
        upstream = self.moto.get_host_and_port()[1]
        server = self

        class Proxy(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                server._forward(self, upstream)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
        self.proxy.daemon_threads = True
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                    "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        return self

    def __exit__(self, *exc):
        self.proxy.shutdown()
        self.proxy.server_close()
        self.moto.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")

    def upload(self, bucket: str, prefix: str, folder, versioned: bool = False) -> None:
        c = self.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
            c.create_bucket(Bucket=bucket)
        if versioned:
            c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        for p in sorted(folder.iterdir()):
            if p.is_file():
                c.upload_file(str(p), bucket, f"{prefix}/{p.name}")

    def sent(self) -> int:
        return sum(n for _, _, n in self.log)

    def _forward(self, h: BaseHTTPRequestHandler, upstream: int) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        key = unquote(urlsplit(h.path).path)
        rng = h.headers.get("Range")
        weight = h.command == "GET" and key.endswith(".safetensors")
        start = int(rng.split("=")[1].split("-")[0]) if weight and rng else 0
        fault = None
        if weight and rng:
            if self.on_range is not None:
                self.on_range(key, start)
            with self._lock:
                fault = self.faults.pop(0) if self.faults else None
        if fault == "503":
            data = b"<Error><Code>ServiceUnavailable</Code><Message>Slow down</Message></Error>"
            h.send_response(503)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if fault == "stall":
            time.sleep(self.stall)
        conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "proxy-connection")}
        conn.request(h.command, h.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        for name, offset in self.corrupt.items():
            if weight and key.endswith(name) and start <= offset < start + len(data):
                data = data[:offset - start] + bytes([data[offset - start] ^ 1]) + data[offset - start + 1:]
        h.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        out = data[:len(data) // 2] if fault == "drop" else data
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            h.wfile.write(out)
            h.wfile.flush()
        if weight:
            with self._lock:
                self.log.append((key, start, len(out)))
        if fault == "drop":
            h.close_connection = True
