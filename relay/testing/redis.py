"""A real ``redis-server`` on loopback for the fleet's tests and benchmark: started on a free port with
nothing persisted, stopped by its PID, restartable on the same port (Redis "going away")."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from relay.testing.certs import ServerCertificates
from relay.testing.harness import free_port, wait_for_port


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


class RedisServer:
    """``redis-server --port <free> --save '' --appendonly no`` as a child process."""

    def __init__(self, workdir: Path, port: int | None = None, *, tls: ServerCertificates | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        #: serve TLS only (``rediss://``) with these certificates
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://localhost:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert_file),
                     "--tls-key-file", str(self.tls.key_file), "--tls-ca-cert-file", str(self.tls.ca_file),
                     "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=log, stderr=log,
        )
        log.close()
        wait_for_port("127.0.0.1", self.port, timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it by its PID (SIGTERM, then SIGKILL); nothing is saved, so a restart starts empty."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
