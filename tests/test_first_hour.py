"""An administrator's first hour: every ordinary mistake gets a precise answer, never a traceback.

Each test runs the real command (``python -m relay ...`` or the installed ``oauth-smtp-relay``) in a
subprocess with a config in a temporary folder, as an admin would; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import Settings, load_settings
from relay.queue.problems import running_user
from relay.queue.spool import Spool
from relay.testing.harness import RelayProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
TENANT = "11111111-1111-1111-1111-111111111111"
CLIENT = "22222222-2222-2222-2222-222222222222"
#: Nothing listens there: a relay that tried to reach Entra ID would fail at once, on loopback.
NOWHERE = "https://127.0.0.1:9"


def run(*args: str, env: Mapping[str, str] | None = None, input: str | None = None,
        timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, input=input,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ if env is None else env), **kw)


def config_text(spool: Path, *, secret: str = "client_secret: a-secret", listen: str = "127.0.0.1:0",
                http: str | None = None) -> str:
    text = (f"listen: [{{address: '{listen}'}}]\n"
            "apps:\n  - name: contoso\n"
            f"    tenant_id: {TENANT}\n    client_id: {CLIENT}\n    {secret}\n"
            f"    authority_host: {NOWHERE}\n    smtp_host: 127.0.0.1\n    smtp_port: 9\n"
            "mailboxes: [{address: noreply@contoso.com, app: contoso}]\n"
            f"spool: {{path: '{spool}'}}\n")
    if http:
        text += f"observability: {{http: '{http}'}}\n"
    return text


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another process (this test) listens on."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        yield int(s.getsockname()[1])


def made_spool(path: Path) -> Path:
    spool = Spool(path)
    spool.open()
    spool.close()
    return path


# --------------------------------------------------------------------------- a port in use

def test_serve_on_a_port_in_use_says_which_and_exits_2(tmp_path: Path, held_port: int) -> None:
    cfg = write(tmp_path / "config.yaml", config_text(tmp_path / "spool", listen=f"127.0.0.1:{held_port}"))
    proc = run("serve", "-c", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{held_port}: address already in use" in proc.stderr.splitlines()[-1]
    no_traceback(proc)


def test_serve_with_the_metrics_port_in_use_names_it(tmp_path: Path, held_port: int) -> None:
    cfg = write(tmp_path / "config.yaml", config_text(tmp_path / "spool", http=f"127.0.0.1:{held_port}"))
    proc = run("serve", "-c", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert (f"cannot listen on 127.0.0.1:{held_port} (observability.http, the metrics and health endpoint): "
            "address already in use") in proc.stderr
    no_traceback(proc)


# --------------------------------------------------------------------------- the spool

def _as_other_user(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI as a user who may not write the spool: as root, drop to nobody once the modules are
    loaded (the interpreter lives where nobody may not read); otherwise the test made the spool read-only."""
    if os.geteuid() != 0:
        return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                              timeout=60, env=dict(env))
    code = ("import os, sys\n"
            "import concurrent.futures.thread, relay.cli, relay.check, relay.service, relay.observability\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "sys.exit(relay.cli.main(sys.argv[1:]))\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          env=dict(env), cwd="/")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder another user can traverse (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="relay-first-hour-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(path)


def test_spool_not_writable_is_named_by_check_offline_and_serve(shared_dir: Path) -> None:
    spool = shared_dir / "spool"
    spool.mkdir()
    cfg = shared_dir / "config.yaml"
    cfg.write_text(config_text(spool, secret="client_secret: ${RELAY_SECRET}"))
    cfg.chmod(0o644)
    env = {**os.environ, "RELAY_SECRET": "s"}
    user = "nobody" if os.geteuid() == 0 else running_user()
    if os.geteuid() != 0:
        spool.chmod(0o555)

    check = _as_other_user(["check", "--offline", "-c", str(cfg)], env)
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"[FAIL] spool {spool}: spool: cannot write {spool} as user {user}: permission denied" in check.stdout
    assert "chown" in check.stdout
    no_traceback(check)

    serve = _as_other_user(["serve", "-c", str(cfg)], env)
    assert serve.returncode == 1, serve.stderr
    assert re.search(rf"spool error: spool: cannot \w[\w ]* {re.escape(str(spool))}\S* as user {user}: "
                     r"permission denied \(EACCES\)", serve.stderr), serve.stderr
    no_traceback(serve)


def test_check_offline_names_a_spool_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    spool = tmp_path / "not-a-dir" / "spool"
    cfg = write(tmp_path / "config.yaml", config_text(spool))
    proc = run("check", "--offline", "-c", str(cfg))
    assert proc.returncode == 1
    assert (f"spool: cannot create {spool} as user {running_user()}: {tmp_path / 'not-a-dir'} is not a directory"
            in proc.stdout)
    serve = run("serve", "-c", str(cfg))
    assert serve.returncode == 1
    assert f"spool: cannot create spool directory {spool} as user {running_user()}: not a directory" in serve.stderr
    no_traceback(serve)


# --------------------------------------------------------------------------- the docs' YAML

_BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FILLED = {"<TENANT_ID>": TENANT, "<CLIENT_ID>": CLIENT, "<MAILBOX>": "noreply@contoso.com",
           "<THUMBPRINT>": "0123456789ABCDEF0123456789ABCDEF01234567"}


def _doc_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for m in _BLOCK.finditer(text):
            blocks.append((f"{doc.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    return blocks


def _as_config(data: Any) -> dict[str, Any] | None:
    """A config example, completed where the block shows only part of one; None for other YAML."""
    if not isinstance(data, dict):
        return None
    app_keys = set(Settings.model_fields["apps"].annotation.__args__[0].model_fields)  # type: ignore[union-attr]
    if set(data) <= app_keys:  # a fragment of one app (a credential)
        data = {"apps": [{"name": "contoso", "tenant_id": TENANT, "client_id": CLIENT, **data}]}
    if not set(data) <= set(Settings.model_fields) or not {"apps", "mailboxes"} & set(data):
        return None
    config: dict[str, Any] = dict(data)
    config.setdefault("apps", [{"name": "contoso", "tenant_id": TENANT, "client_id": CLIENT, "client_secret": "s"}])
    config.setdefault("mailboxes", [{"address": "noreply@contoso.com", "app": config["apps"][0]["name"]}])
    return config


@pytest.mark.parametrize(("where", "block"), _doc_blocks(), ids=[w for w, _ in _doc_blocks()])
def test_every_yaml_block_in_the_docs_parses_and_configs_validate(where: str, block: str, tmp_path: Path) -> None:
    documents = list(yaml.safe_load_all(block))  # invalid YAML fails here, naming the block
    assert documents, where
    for data in documents:
        config = _as_config(data)
        if config is None:
            continue
        text = yaml.safe_dump(config)
        for placeholder, value in _FILLED.items():
            text = text.replace(placeholder, value)
        env = {name: TENANT if "TENANT" in name else CLIENT if "CLIENT_ID" in name else f"/run/example/{name}"
               for name in _VAR.findall(text)}
        settings = load_settings(write(tmp_path / "config.yaml", text), env, read_secrets=False)
        assert settings.apps and settings.mailboxes, where


def test_the_docs_have_full_config_examples_to_check() -> None:
    full = [w for w, b in _doc_blocks() for d in yaml.safe_load_all(b)
            if isinstance(d, dict) and {"apps", "mailboxes"} <= set(d)]
    assert {w.split(":")[0] for w in full} >= {"README.md", "docs/docker.md", "docs/graph.md", "docs/clouds.md"}


# --------------------------------------------------------------------------- admin commands, no credential

def test_admin_commands_work_from_a_shell_without_credentials_directory(tmp_path: Path) -> None:
    """docs/systemd.md's invocations, run as written (the program and the config path swapped)."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "client_secret").write_text("a-secret\n")
    http = f"127.0.0.1:{free_port()}"
    cfg = write(tmp_path / "config.yaml", config_text(
        tmp_path / "spool", listen=f"127.0.0.1:{free_port()}", http=http,
        secret="client_secret_file: ${CREDENTIALS_DIRECTORY}/client_secret"))
    shell_env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}

    doc = (ROOT / "docs" / "systemd.md").read_text()
    prefix = "sudo /opt/oauth-smtp-relay/bin/oauth-smtp-relay "
    commands = [line.removeprefix(prefix).replace("/etc/oauth-smtp-relay/config.yaml", str(cfg)).split()
                for line in doc.splitlines() if line.startswith(prefix)]
    verbs = [c[0] if c[0] != "check" else " ".join(c[:2]) for c in commands]
    assert verbs == ["check --offline", "exchange-setup", "queue", "health"], verbs

    # The service itself gets the credential, as systemd's LoadCredential= gives it.
    relay = RelayProcess(cfg, env={"CREDENTIALS_DIRECTORY": str(creds)})
    relay.start(int(yaml.safe_load(cfg.read_text())["listen"][0]["address"].rsplit(":", 1)[1]))
    try:
        wait_until(lambda: run("health", "--url", f"http://{http}/readyz", env=shell_env).returncode == 0,
                   30, "the relay to be ready")
        for command in commands:
            proc = run(*command, env=shell_env)
            assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
            assert "CREDENTIALS_DIRECTORY is not set" not in proc.stdout + proc.stderr, command
            no_traceback(proc)
            if command[0] == "check":
                assert "all checks passed" in proc.stdout
                assert ("note: not read here: apps[0].client_secret_file (${CREDENTIALS_DIRECTORY} is not set)"
                        in proc.stderr)
            if command[0] == "health":
                assert json.loads(proc.stdout)["ready"] is True
            if command[0] == "queue":
                assert "queue is empty" in proc.stdout
    finally:
        assert relay.terminate() == 0
    # What does use the credential still needs it, and says which variable is missing.
    serve = run("serve", "-c", str(cfg), env=shell_env)
    assert serve.returncode == 2
    assert "apps[0].client_secret_file: environment variable CREDENTIALS_DIRECTORY is not set" in serve.stderr


# --------------------------------------------------------------------------- queue --json, pipes, terminals

def test_queue_json_is_accepted_after_the_verb_too(tmp_path: Path) -> None:
    spool = made_spool(tmp_path / "spool")
    for args in (["queue", "--spool", str(spool), "list", "--json"], ["queue", "--json", "--spool", str(spool), "list"],
                 ["queue", "--spool", str(spool), "holds", "--json"]):
        proc = run(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert json.loads(proc.stdout) in ([], {"relay_running": False, "holds": []}), args
    text = run("queue", "--spool", str(spool), "list")
    assert text.stdout.strip() == "queue is empty"
    missing = run("queue", "--spool", str(spool), "show", "0000000000000000", "--json")
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"] == "no message 0000000000000000"


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader has already gone (`... | head` after head exits)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "relay", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, cwd=ROOT)
    finally:
        os.close(write_end)


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    spool = made_spool(tmp_path / "spool")
    for args in (["queue", "--spool", str(spool), "list"], ["example-config"]):
        proc = _closed_pipe_run(*args)
        assert proc.returncode == 141, (args, proc.stderr)
        assert proc.stderr == "", (args, proc.stderr)


def test_hash_password_from_a_pipe_says_to_use_password_stdin() -> None:
    proc = run("hash-password", input="a-password\n")
    assert proc.returncode == 2
    assert "standard input is not a terminal" in proc.stderr and "--password-stdin" in proc.stderr
    assert proc.stdout == ""
    no_traceback(proc)
    ok = run("hash-password", "--password-stdin", input="a-password\n")
    assert ok.returncode == 0 and ok.stdout.startswith("scrypt$"), ok.stderr


# --------------------------------------------------------------------------- the example config and the package

def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "oauth-smtp-relay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "relay"]


def test_example_config_command_prints_the_shipped_example() -> None:
    proc = subprocess.run([*_console_script(), "example-config"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    shipped = (ROOT / "relay" / "config.example.yaml").read_text()
    assert proc.stdout == shipped == (ROOT / "config.example.yaml").read_text()
    assert "tenant_id: <TENANT_ID>" in proc.stdout


def test_the_wheel_ships_the_example_and_the_licence_and_builds_without_warnings(tmp_path: Path) -> None:
    setuptools = pytest.importorskip("setuptools")
    assert int(setuptools.__version__.split(".")[0]) >= 77, setuptools.__version__
    # From a copy: an in-tree build would leave build/ behind, and ship whatever an older one left there.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "tests", "bench"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "Warning" not in build.stdout + build.stderr, [
        line for line in (build.stdout + build.stderr).splitlines() if "Warning" in line]
    (wheel,) = tmp_path.glob("oauth_smtp_relay-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert z.read("relay/config.example.yaml").decode() == (ROOT / "relay" / "config.example.yaml").read_text()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "License-Expression: MIT" in metadata.splitlines()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_docs_install_from_a_checkout_or_a_wheel_not_from_an_index() -> None:
    docs = {p.name: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]}
    for name, text in docs.items():
        assert not re.search(r"pip install oauth-smtp-relay\b(?!\S)", text), name
        assert "config.example.yaml /etc" not in text, name  # the installed package has no such file: example-config
    assert "not published on a package index" in docs["README.md"]
    assert "pip wheel --no-deps -w dist ." in docs["systemd.md"]


# --------------------------------------------------------------------------- config errors

def test_config_errors_name_the_real_problem_without_validator_echo(tmp_path: Path) -> None:
    cfg = write(tmp_path / "config.yaml",
                f"apps:\n  - name: a\n    tenant_id: {TENANT}\n    client_id: {CLIENT}\n    client_secret: s\n"
                "    smtp_port: abc\nmailboxes: [{address: a@b.com, app: a, transport: smtpx}]\n")
    proc = run("serve", "-c", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines == [
        f"configuration error: {cfg}: apps[0].smtp_port: expected a whole number",
        f"{cfg}: mailboxes[0].transport: expected one of 'smtp' or 'graph'",
        "(`oauth-smtp-relay example-config` prints an example with every key explained)",
    ], lines
    empty = run("serve", "-c", str(write(tmp_path / "empty.yaml", "apps: []\nmailboxes: []\n")))
    assert f"{tmp_path / 'empty.yaml'}: apps: needs at least 1 entry" in empty.stderr
    assert "Tuple" not in proc.stderr + empty.stderr and "Input should" not in proc.stderr


def test_a_yaml_syntax_error_is_not_called_a_key_problem(tmp_path: Path) -> None:
    cfg = write(tmp_path / "config.yaml", "accept: {networks: [127.0.0.0/8, ::1]}\n")
    proc = run("check", "--offline", "-c", str(cfg))
    assert proc.returncode == 2
    assert f"[FAIL] configuration: {cfg}: not valid YAML at line 1, column" in proc.stdout
    assert "Fix the key" not in proc.stdout and "quote values" in proc.stdout
    serve = run("serve", "-c", str(cfg))
    assert serve.returncode == 2 and "example-config" not in serve.stderr and "not valid YAML" in serve.stderr


def test_all_placeholders_are_reported_at_once(tmp_path: Path) -> None:
    example = ROOT / "config.example.yaml"
    proc = run("check", "--offline", "-c", str(example))
    assert proc.returncode == 2
    for key, placeholder in (("apps[0].tenant_id", "<TENANT_ID>"), ("apps[0].client_id", "<CLIENT_ID>"),
                             ("mailboxes[0].address", "<MAILBOX>"), ("sender.default_mailbox", "<MAILBOX>")):
        assert f"{key}: '{placeholder}' is a placeholder from the example config" in proc.stdout, key
    assert "Fix the key(s) named above; `oauth-smtp-relay example-config`" in proc.stdout


def test_the_all_zero_guids_of_documentation_examples_are_refused(tmp_path: Path) -> None:
    zero = "00000000-0000-0000-0000-000000000000"
    cfg = write(tmp_path / "config.yaml",
                f"apps:\n  - name: a\n    tenant_id: {zero}\n    client_id: {zero}\n    client_secret: s\n"
                "mailboxes: [{address: a@b.com, app: a}]\n")
    proc = run("check", "--offline", "-c", str(cfg))
    assert proc.returncode == 2
    assert f"apps[0].tenant_id: {zero} is the all-zero example value, not a tenant" in proc.stdout
    assert f"apps[0].client_id: {zero} is the all-zero example value, not an app" in proc.stdout


# --------------------------------------------------------------------------- demo, unit, check --send-to

def test_demo_prints_its_spool_and_why_it_is_not_on_2525(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 2525))
        holder.listen()
    except OSError:
        pass  # someone else holds 2525 already: the demo must say so all the same
    try:
        proc = run("demo", "--messages", "1", "--workdir", str(tmp_path / "demo"), timeout=180)
    finally:
        holder.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not on 127.0.0.1:2525: 127.0.0.1:2525 is not free (address already in use" in proc.stdout
    spool = tmp_path / "demo" / "spool"
    assert f"oauth-smtp-relay queue --spool {spool} list" in proc.stdout
    queue = run("queue", "--spool", str(spool), "list")
    assert queue.returncode == 0 and queue.stdout.strip() == "queue is empty", queue.stderr


def test_the_unit_points_to_the_docs_the_install_step_puts_there() -> None:
    unit = (ROOT / "systemd" / "oauth-smtp-relay.service").read_text()
    docs = re.findall(r"^Documentation=file:(\S+)$", unit, re.M)
    assert docs, "no Documentation=file: line"
    install = (ROOT / "docs" / "systemd.md").read_text()
    m = re.search(r"install -D -m 0644 -t (\S+) README\.md docs/\*\.md", install)
    assert m is not None
    for path in docs:
        assert path.startswith(m.group(1) + "/")
        assert (ROOT / ("README.md" if path.endswith("README.md") else f"docs/{Path(path).name}")).is_file()


def test_check_offline_says_send_to_is_ignored(tmp_path: Path) -> None:
    cfg = write(tmp_path / "config.yaml", config_text(tmp_path / "spool"))
    proc = run("check", "--offline", "--send-to", "you@contoso.com", "-c", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "note: --send-to is ignored with --offline: no test message was sent" in proc.stderr
    quiet = run("check", "--offline", "-c", str(cfg))
    assert quiet.returncode == 0 and "--send-to" not in quiet.stderr


# --------------------------------------------------------------------------- other ordinary conditions

def test_a_listener_certificate_that_does_not_load_is_a_config_error(tmp_path: Path) -> None:
    text = config_text(tmp_path / "spool").replace("listen: [{address: '127.0.0.1:0'}]",
                                                    "listen: [{address: '127.0.0.1:0', tls: starttls}]")
    tls = f"tls: {{cert_file: {tmp_path}/cert.pem, key_file: {tmp_path}/key.pem}}\n"
    cfg = write(tmp_path / "config.yaml", text + tls)
    expected = (f"tls.cert_file: cannot load the certificate {tmp_path}/cert.pem with the key {tmp_path}/key.pem: "
                "No such file or directory")
    check = run("check", "--offline", "-c", str(cfg))
    assert check.returncode == 1 and f"[FAIL] listener TLS certificate: {cfg}: {expected}" in check.stdout
    serve = run("serve", "-c", str(cfg))
    assert serve.returncode == 2 and f"configuration error: {cfg}: {expected}" in serve.stderr
    no_traceback(serve)


def test_health_with_a_wrong_url_and_demo_with_an_unusable_workdir(tmp_path: Path) -> None:
    health = run("health", "--url", "127.0.0.1:9465/readyz")
    assert health.returncode == 2 and "not an http:// URL: '127.0.0.1:9465/readyz'" in health.stderr
    (tmp_path / "file").write_text("")
    demo = run("demo", "--workdir", str(tmp_path / "file" / "demo"))
    assert demo.returncode == 1
    assert f"demo: cannot create {tmp_path / 'file' / 'demo'}: not a directory" in demo.stderr
    for proc in (health, demo):
        no_traceback(proc)
