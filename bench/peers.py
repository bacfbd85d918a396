"""The peers measured beside the relay in the same run: Postfix (relaying to its ``smtp-sink``) and
email-oauth2-proxy (``emailproxy`` from PyPI, client credentials against the simulated Entra ID,
relaying to the simulated Exchange).

Each peer is started from scratch in the benchmark's work directory, on loopback ports only, and
stopped afterwards. When one cannot run here (not installed, not root for Postfix, failed to start)
:class:`PeerUnavailable` says why and its row is skipped with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay.testing.harness import free_port, wait_for_port


class PeerUnavailable(Exception):
    """This peer cannot be measured on this machine; the message says why."""


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    try:
        wait_for_port("127.0.0.1", port, timeout, proc)
    except (TimeoutError, RuntimeError) as exc:
        raise PeerUnavailable(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Postfix
# ---------------------------------------------------------------------------------------------

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{address} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance (own config, queue and log directories) relaying to smtp-sink.

    Stock settings except what a relay on loopback needs: ``mynetworks = 127.0.0.0/8``, no local
    delivery, ``relayhost`` = the sink, no DNS. Its queue is on the same file system as the relay's
    spool and fsyncs as Postfix always does.
    """

    def __init__(self, workdir: Path) -> None:
        # Postfix's daemons run as the postfix user and must reach their directories, so the
        # instance lives in a directory of its own that others may enter (the benchmark's work
        # directory may be private); the same file system as the relay's spool (/tmp).
        self.workdir = workdir
        self.dir = Path(tempfile.mkdtemp(prefix="relay-bench-postfix-"))
        self.dir.chmod(0o755)
        self.port = 0
        self.sink_port = 0
        self._sink: subprocess.Popen[bytes] | None = None
        self._started = False

    def start(self) -> Postfix:
        postfix = shutil.which("postfix") or "/usr/sbin/postfix"
        sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not Path(postfix).exists() or not Path(sink).exists():
            raise PeerUnavailable("Postfix is not installed (Debian: apt-get install postfix)")
        if os.geteuid() != 0:
            raise PeerUnavailable("a private Postfix instance needs root to start")
        conf, queue, data = self.dir / "conf", self.dir / "queue", self.dir / "data"
        for d in (conf, queue, data):
            d.mkdir(parents=True, exist_ok=True)
        self.port, self.sink_port = free_port(), free_port()
        shutil.chown(data, "postfix", "postfix")
        (conf / "master.cf").write_text(_MASTER_CF.format(address=f"127.0.0.1:{self.port}"))
        (conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench-postfix.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{self.sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtpd_tls_security_level = none
disable_dns_lookups = yes
smtp_host_lookup = native
smtpd_peername_lookup = no
biff = no
maillog_file_prefixes = {self.dir}
maillog_file = {self.dir / "maillog"}
""")
        self._sink = subprocess.Popen(
            [sink, "-u", "postfix", f"127.0.0.1:{self.sink_port}", "256"],
            stdout=subprocess.DEVNULL, stderr=(self.dir / "smtp-sink.log").open("ab"),
        )
        _wait_port(self.sink_port, 10, self._sink)
        env = {**os.environ, "MAIL_CONFIG": str(conf)}
        proc = subprocess.run([postfix, "-c", str(conf), "start"], capture_output=True, text=True, env=env,
                              timeout=60)
        if proc.returncode != 0:
            self.stop()
            reason = (proc.stderr or proc.stdout).strip()
            with contextlib.suppress(OSError):
                fatal = [ln for ln in (self.dir / "maillog").read_text().splitlines() if "fatal:" in ln]
                reason = fatal[0].split("fatal:", 1)[1].strip() if fatal else reason
            raise PeerUnavailable(f"postfix start failed: {reason[-300:]}")
        self._started = True
        _wait_port(self.port, 20)
        return self

    def stop(self) -> None:
        conf = self.dir / "conf"
        if self._started:
            subprocess.run(["postfix", "-c", str(conf), "stop"], capture_output=True, timeout=60,
                           env={**os.environ, "MAIL_CONFIG": str(conf)})
            self._started = False
            pid_file = self.dir / "queue" / "pid" / "master.pid"
            deadline = time.monotonic() + 15
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self._sink is not None and self._sink.poll() is None:
            self._sink.terminate()
            try:
                self._sink.wait(10)
            except subprocess.TimeoutExpired:
                self._sink.kill()
                self._sink.wait(10)
        # Keep the log beside the benchmark's other logs; the queue goes.
        with contextlib.suppress(OSError):
            if (self.dir / "maillog").exists():
                shutil.copy(self.dir / "maillog", self.workdir / "postfix-maillog")
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# email-oauth2-proxy
# ---------------------------------------------------------------------------------------------


class EmailProxy:
    """``emailproxy --no-gui`` with one SMTP server section and one client-credentials account.

    The account is the mailbox the app has FullAccess on (the proxy sends ``user=<account>`` in
    XOAUTH2); clients log in to the proxy with that name and any password (the first login's
    password encrypts the cached token, as the proxy documents). ``SSL_CERT_FILE`` makes both its
    token requests and its upstream STARTTLS trust the simulated Microsoft 365's CA.
    """

    def __init__(self, workdir: Path, *, token_url: str, client_id: str, secret: str, account: str,
                 smtp_port: int, ca_file: Path) -> None:
        self.dir = workdir / "emailproxy"
        self.token_url, self.client_id, self.secret, self.account = token_url, client_id, secret, account
        self.smtp_port, self.ca_file = smtp_port, ca_file
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EmailProxy:
        try:
            import emailproxy  # noqa: F401
        except ImportError as exc:
            raise PeerUnavailable(f"email-oauth2-proxy is not installed (pip install emailproxy): {exc}") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.dir / "emailproxy.config"
        config.write_text(f"""\
[SMTP-{self.port}]
local_address = 127.0.0.1
server_address = localhost
server_port = {self.smtp_port}
server_starttls = True

[{self.account}]
token_url = {self.token_url}
oauth2_scope = https://outlook.office365.com/.default
oauth2_flow = client_credentials
client_id = {self.client_id}
client_secret = {self.secret}

[emailproxy]
delete_account_token_on_password_error = False
""")
        log = (self.dir / "emailproxy.out").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emailproxy", "--no-gui", "--config-file", str(config),
             "--log-file", str(self.dir / "emailproxy.log")],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "SSL_CERT_FILE": str(self.ca_file)},
        )
        log.close()
        _wait_port(self.port, 30, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
