"""Starts `bitnet serve` on a free loopback port for the tests (BITNET_BIN names the binary)."""

import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import openai
import pytest

BIN = os.environ.get("BITNET_BIN", "target/ci/bitnet")


class Server:
    """One `bitnet serve` process on 127.0.0.1 with a port the OS chose."""

    def __init__(self, *args, startup_timeout=60):
        self.args = [BIN, "serve", "--host", "127.0.0.1", "--port", "0", *args]
        env = {k: v for k, v in os.environ.items() if k not in ("BITNET_MODEL", "BITNET_API_KEY")}
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.stderr_lines = []
        line = self.proc.stdout.readline()
        m = re.match(r"listening on (http://\S+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"no address from {self.args}: {line!r} {self.proc.stderr.read()}")
        self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        deadline = time.time() + startup_timeout
        while time.time() < deadline:
            status, _ = self.get("/health")
            if status == 200:
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"the server did not become ready: {self.stderr_lines}")

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def pid(self):
        return self.proc.pid

    def get(self, path, headers=None):
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (ConnectionError, urllib.error.URLError):
            return None, b""

    def post(self, path, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), dict(e.headers)

    def raw(self, data, timeout=30, send_pause=None, slow_from=0):
        """Sends raw bytes (in pieces of 64 KiB, or byte by byte with a pause), reads until
        the server closes or answers; returns (status or None, the whole answer)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            try:
                step = 1 if send_pause else 65536
                sock.sendall(data[:slow_from])
                for i in range(slow_from, len(data), step):
                    sock.sendall(data[i : i + step])
                    if send_pause:
                        # Stop sending once the server has answered (else its close could
                        # reset the connection and lose the answer).
                        if select.select([sock], [], [], send_pause)[0]:
                            break
            except OSError:
                pass  # the server answered (and closed) before the whole request was sent
            out = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    out += chunk
                    if b"\r\n\r\n" in out:
                        head, _, rest = out.partition(b"\r\n\r\n")
                        m = re.search(rb"content-length: *(\d+)", head, re.I)
                        if m and len(rest) >= int(m.group(1)):
                            break
            except OSError:
                pass
        finally:
            sock.close()
        m = re.match(rb"HTTP/1\.1 (\d+)", out)
        return (int(m.group(1)) if m else None), out

    def metrics(self):
        """The Prometheus samples as {name{labels}: value}."""
        status, body = self.get("/metrics")
        assert status == 200
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout=30):
        """Waits until nothing runs or waits; returns the metrics."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if m["bitnet_requests_running"] == 0 and m["bitnet_requests_queued"] == 0:
                return m
            if time.time() > deadline:
                raise AssertionError(f"still busy after {timeout} s: {m}")
            time.sleep(0.05)

    def rss_bytes(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return None

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server():
    s = Server("--parallel", "4", "--max-queue", "64")
    yield s
    assert s.stop() == 0, "".join(s.stderr_lines)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id
