"""Ops defaults of a fresh install, over real HTTP against real servers:

- ``can serve`` (a subprocess, production mode, after ``collectstatic``) answers ``/static/`` with
  the admin's CSS and JS (content types, cache headers, ETags, gzip), and a staff user who signed
  in with the second factor gets the admin's autocomplete JSON (tenant picker on "Add API key",
  parent picker on a tenant) from it;
- outside dev mode ``can serve`` and the ASGI app refuse the development, an empty or a weak
  ``SECRET_KEY`` with a message naming the variable and how to make one, and ``can serve`` prints
  what ``check --deploy`` finds (warnings do not stop it, errors do);
- every ``/v1`` answer carries ``x-request-id``, a 401 without a key included; ``/`` and the admin's
  "View site" link lead to the admin.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import checks
from django.core.management import CommandError, call_command
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from tenants import services
from tests.processes import database_url, free_port

ROOT = Path(__file__).resolve().parent.parent
CAN = str(Path(sys.executable).with_name("can"))
PASSWORD = "correct horse battery staple"
STRONG_SECRET = "test-only-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEFG"
GENERATE_HINT = "secrets.token_urlsafe(50)"


def base_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """A production-mode environment on the test database, with its own var directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "SECRET_KEY_FILE", "CHITTYCAN_MODE")}
    env.update(
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        CHITTYCAN_REDIS_PREFIX=settings.REDIS_PREFIX,
        CHITTYCAN_VAR_DIR=str(var_dir),
        CHITTYCAN_STATIC_ROOT=str(var_dir / "static"),
        LOG_LEVEL="WARNING",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra)
    return env


class Served:
    """``can serve`` in a subprocess on a free port; its output goes to files in its var directory
    so that what it printed at start-up can be read while it runs."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        logs = Path(env["CHITTYCAN_VAR_DIR"])
        self.stderr_path = logs / f"serve-{self.port}.err"
        with open(logs / f"serve-{self.port}.out", "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [CAN, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"can serve exited ({self.proc.returncode}):\n{self.stderr()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("can serve did not start") from None
                time.sleep(0.1)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A var directory whose static/ was filled by ``collectstatic``, as `make install` does."""
    var_dir = tmp_path_factory.mktemp("var")
    result = subprocess.run(
        [CAN, "collectstatic", "--no-input", "-v", "0"],
        cwd=ROOT,
        env=base_env(var_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (var_dir / "static" / "admin" / "css" / "base.css").is_file()
    return var_dir


@pytest.fixture(scope="module")
def served(collected: Path, django_db_setup: Any) -> Iterator[Served]:
    """`can serve` in production mode on the test database, once for this module's tests."""
    server = Served(base_env(collected, SECRET_KEY=STRONG_SECRET))
    yield server
    server.stop()


def current_code(device: TOTPDevice) -> str:
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    return f"{totp.token():0{device.digits}d}"


def staff_session(base_url: str) -> httpx.Client:
    """Sign in to the admin over HTTP with password and TOTP code, as a browser does."""
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", PASSWORD)
    device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)
    client = httpx.Client(base_url=base_url, timeout=10)
    page = client.get("/admin/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None, page.text[:500]
    response = client.post(
        "/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": token.group(1),
            "username": "ops",
            "password": PASSWORD,
            "otp_token": current_code(device),
            "next": "/admin/",
        },
        headers={"Referer": f"{base_url}/admin/login/"},
    )
    assert response.status_code == 302 and response.headers["location"] == "/admin/", response.text[:2000]
    return client


# --- static files ---------------------------------------------------------------------------------


def test_can_serve_answers_the_admin_static_files_with_types_and_cache_headers(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as client:
        css = client.get("/static/admin/css/base.css")
        assert css.status_code == 200
        assert css.headers["content-type"].startswith("text/css")
        assert "max-age=" in css.headers["cache-control"] and "public" in css.headers["cache-control"]
        assert b"body" in css.content and len(css.content) > 1000

        js = client.get("/static/admin/js/autocomplete.js")
        assert js.status_code == 200
        assert "javascript" in js.headers["content-type"]
        assert b"select2" in js.content

        # Revalidation: the ETag gives a 304 with no body.
        etag = js.headers["etag"]
        again = client.get("/static/admin/js/autocomplete.js", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""

        # collectstatic wrote gzip variants; a client that accepts gzip gets one (httpx decodes it).
        gz = client.get("/static/admin/css/base.css", headers={"Accept-Encoding": "gzip"})
        assert gz.status_code == 200 and gz.headers.get("content-encoding") == "gzip"
        assert gz.content == css.content

        head = client.head("/static/admin/css/base.css")
        assert head.status_code == 200 and head.content == b""
        assert client.post("/static/admin/css/base.css").status_code == 405

        # A file that does not exist is Django's 404, not a crash.
        assert client.get("/static/admin/css/no-such-file.css").status_code == 404


def test_admin_autocomplete_pickers_work_over_http(served: Served, transactional_db: Any) -> None:
    acme = services.tenant_create(slug="acme", name="Acme Corp")
    services.tenant_create(slug="acme-research", name="Acme Research", parent=acme, kind="team")
    services.tenant_create(slug="globex", name="Globex")
    client = staff_session(served.url)

    # "Add API key": the page loads the widget's JavaScript, which the server answers.
    add_key = client.get("/admin/tenants/apikey/add/")
    assert add_key.status_code == 200
    assert "admin-autocomplete" in add_key.text
    scripts = set(re.findall(r'src="(/static/[^"]+\.js)"', add_key.text))
    assert "/static/admin/js/autocomplete.js" in scripts
    for src in scripts:
        assert client.get(src).status_code == 200, src
    for href in set(re.findall(r'href="(/static/[^"]+\.css)"', add_key.text)):
        assert client.get(href).status_code == 200, href

    # The tenant picker's JSON endpoint returns the tenants, and filters by the typed term.
    picker = {"app_label": "tenants", "model_name": "apikey", "field_name": "tenant"}
    everything = client.get("/admin/autocomplete/", params={**picker, "term": ""})
    assert everything.status_code == 200
    texts = [r["text"] for r in everything.json()["results"]]
    assert len(texts) == 3 and any("acme-research" in t or "Acme Research" in t for t in texts)
    found = client.get("/admin/autocomplete/", params={**picker, "term": "glob"}).json()["results"]
    assert len(found) == 1 and "lobex" in found[0]["text"]

    # The parent picker on a tenant.
    parent = {"app_label": "tenants", "model_name": "tenant", "field_name": "parent", "term": "acme"}
    results = client.get("/admin/autocomplete/", params=parent).json()["results"]
    assert len(results) == 2
    assert client.get(f"/admin/tenants/tenant/{acme.pk}/change/").status_code == 200

    # Signed out, the endpoint gives nothing away.
    anonymous = httpx.get(f"{served.url}/admin/autocomplete/", params={**picker, "term": ""})
    assert anonymous.status_code in (302, 403) and "acme" not in anonymous.text
    client.close()


# --- SECRET_KEY and check --deploy -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        (None, "SECRET_KEY is not set"),
        ("chittycan-insecure-development-secret-change-me", "SECRET_KEY is not set"),
        ("short-secret", "SECRET_KEY is too weak"),
        ("a" * 60, "SECRET_KEY is too weak"),
    ],
)
def test_can_serve_refuses_to_start_in_production_without_a_real_secret(tmp_path: Path, secret, why) -> None:
    env = base_env(tmp_path)
    if secret is not None:
        env["SECRET_KEY"] = secret
    result = subprocess.run(
        [CAN, "serve", "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert why in result.stderr and GENERATE_HINT in result.stderr and "CHITTYCAN_MODE=dev" in result.stderr
    assert "ChittyCan gateway on" not in result.stdout  # no server was started


def test_the_asgi_app_itself_refuses_the_development_secret_outside_dev_mode(tmp_path: Path) -> None:
    """`uvicorn chittycan.asgi:application` (bypassing `can serve`) refuses too; dev mode does not."""
    code = "import chittycan.asgi"
    prod = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=base_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert prod.returncode != 0
    assert "InsecureSecretKey" in prod.stderr and "SECRET_KEY is not set" in prod.stderr
    dev = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=base_env(tmp_path, CHITTYCAN_MODE="dev"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dev.returncode == 0, dev.stderr


@pytest.mark.parametrize("program", ["worker", "beat"])
def test_celery_worker_and_beat_refuse_the_development_secret_outside_dev_mode(tmp_path: Path, program) -> None:
    celery = str(Path(sys.executable).with_name("celery"))
    argv = [celery, "-A", "chittycan", program, "-l", "warning"]
    if program == "beat":
        argv += ["-s", str(tmp_path / "beat-schedule")]
    result = subprocess.run(argv, cwd=ROOT, env=base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "ChittyCan refuses to start: SECRET_KEY is not set" in result.stderr
    assert GENERATE_HINT in result.stderr


def test_secret_from_a_file_is_accepted(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(STRONG_SECRET + "\n")
    code = "import chittycan.asgi; from django.conf import settings; print(len(settings.SECRET_KEY))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=base_env(tmp_path, SECRET_KEY_FILE=str(secret_file)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(STRONG_SECRET))


def test_can_serve_prints_check_deploy_warnings_and_still_serves(served: Served) -> None:
    assert httpx.get(f"{served.url}/healthz", timeout=10).json() == {"status": "ok"}
    err = served.stderr()
    # The default settings have no HTTPS hardening: Django's deployment checks say so.
    assert "check --deploy: ?: (security.W004)" in err
    assert "check --deploy: ?: (security.W012)" in err
    assert "serving anyway" in err


@checks.register(checks.Tags.security, deploy=True)
def _failing_deploy_check(**kwargs: Any) -> list[checks.CheckMessage]:
    """An error-level deployment finding, only while a test switches it on."""
    if not _failing_deploy_check.on:  # type: ignore[attr-defined]
        return []
    return [checks.Error("test-only deployment error", id="tests.E001")]


_failing_deploy_check.on = False  # type: ignore[attr-defined]


@pytest.fixture
def deploy_error() -> Iterator[None]:
    _failing_deploy_check.on = True  # type: ignore[attr-defined]
    yield
    _failing_deploy_check.on = False  # type: ignore[attr-defined]


def test_an_error_from_check_deploy_stops_can_serve(
    deploy_error: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings.CHITTYCAN_MODE == "prod" and settings.CHITTYCAN_SECRET_KEY_PROBLEM == ""

    def no_exec(*args: Any) -> None:
        raise AssertionError("can serve started the server despite a deployment error")

    monkeypatch.setattr(os, "execv", no_exec)
    with pytest.raises(CommandError, match=r"check --deploy` found 1 error"):
        call_command("serve", "--port", "1")  # refused before the server would be exec'd
    assert "tests.E001" in capsys.readouterr().err


def test_dev_mode_skips_the_production_checks(tmp_path: Path) -> None:
    """`make run` (dev mode) starts without a SECRET_KEY: the development default is fine there."""
    env = base_env(tmp_path, CHITTYCAN_MODE="dev")
    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'chittycan.settings'); django.setup();"
        "from django.conf import settings; print(repr(settings.CHITTYCAN_SECRET_KEY_PROBLEM))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "''", result.stderr


# --- x-request-id on every /v1 answer, and / ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/gpt-4o"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/messages"),
        ("GET", "/v1/no-such-route"),
        ("POST", "/v1/models"),
    ],
)
def test_every_v1_answer_without_a_key_carries_a_request_id(gateway_server, transactional_db, method, path) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "input": "hi", "max_tokens": 5}
    response = httpx.request(method, f"{gateway_server.url}{path}", json=body if method == "POST" else None)
    assert response.status_code in (401, 404, 405), response.text
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.headers.get("x-request-id", "")), response.headers
    if response.status_code == 401:
        assert "error" in response.json()


def test_a_v1_answer_with_a_key_carries_one_request_id(gateway_server, tenant_key) -> None:
    response = httpx.get(f"{gateway_server.url}/v1/models", headers={"Authorization": f"Bearer {tenant_key[1]}"})
    assert response.status_code == 200
    assert len(response.headers.get_list("x-request-id")) == 1


def test_root_and_the_admins_view_site_link_lead_to_the_admin(gateway_server, transactional_db) -> None:
    root = httpx.get(f"{gateway_server.url}/")
    assert root.status_code == 302 and root.headers["location"] == "/admin/"
    client = staff_session(gateway_server.url)
    index = client.get("/admin/")
    assert index.status_code == 200
    view_site = re.search(r'<a href="([^"]+)">View site</a>', index.text)
    assert view_site is not None
    landed = client.get(view_site.group(1), follow_redirects=True)
    assert landed.status_code == 200 and str(landed.url).endswith("/admin/")
    client.close()


# --- can quickstart: no default admin password in production ---------------------------------------


def quickstart(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CAN, "quickstart", "--key-file", str(tmp_path / "demo-key.txt")],
        cwd=ROOT,
        env=base_env(tmp_path, SECRET_KEY=settings.SECRET_KEY, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_quickstart_in_production_creates_no_admin_with_a_default_password(tmp_path: Path, transactional_db) -> None:
    result = quickstart(tmp_path)
    assert result.returncode == 0, result.stderr
    assert not get_user_model().objects.filter(username="admin").exists()
    assert "can createsuperuser --username admin" in result.stdout and "CHITTYCAN_ADMIN_PASSWORD" in result.stdout
    assert "chittycan-admin" not in result.stdout and "offline mock" not in result.stdout
    assert "export OPENAI_API_KEY=chitty_" in result.stdout  # the demo tenant and key still come


def test_quickstart_in_production_takes_the_password_from_the_environment(tmp_path: Path, transactional_db) -> None:
    weak = quickstart(tmp_path, CHITTYCAN_ADMIN_PASSWORD="admin")
    assert weak.returncode != 0 and "CHITTYCAN_ADMIN_PASSWORD is refused" in weak.stderr
    assert not get_user_model().objects.filter(username="admin").exists()
    strong = quickstart(tmp_path, CHITTYCAN_ADMIN_PASSWORD=PASSWORD)
    assert strong.returncode == 0, strong.stderr
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.check_password(PASSWORD) and not admin.check_password("chittycan-admin")
    assert PASSWORD not in strong.stdout  # the operator's secret is not echoed


def test_quickstart_in_dev_mode_keeps_the_local_default(tmp_path: Path, transactional_db) -> None:
    result = quickstart(tmp_path, CHITTYCAN_MODE="dev")
    assert result.returncode == 0, result.stderr
    assert get_user_model().objects.get(username="admin").check_password("chittycan-admin")
    assert "admin / chittycan-admin" in result.stdout and "offline mock" in result.stdout


def test_the_https_settings_from_the_environment_satisfy_check_deploy(tmp_path: Path) -> None:
    hardened = {
        "SECRET_KEY": STRONG_SECRET,
        "SESSION_COOKIE_SECURE": "true",
        "CSRF_COOKIE_SECURE": "true",
        "SECURE_SSL_REDIRECT": "true",
        "SECURE_HSTS_SECONDS": "31536000",
        "CHITTYCAN_TRUST_X_FORWARDED_PROTO": "true",
    }
    # Without them `can serve` prints these (test_can_serve_prints_check_deploy_warnings_and_still_serves).
    result = subprocess.run(
        [CAN, "check", "--deploy"],
        cwd=ROOT,
        env=base_env(tmp_path, **hardened),
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for check_id in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check_id not in output, output


_PROBE_SCRIPT = """
import asyncio, json, sys
import chittycan.asgi

async def get(path, method="GET"):
    sent, asked = [], []
    async def receive():
        if asked:
            await asyncio.Future()  # the client stays: no disconnect until the answer is out
        asked.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}
    async def send(message):
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 80)}
    await chittycan.asgi.application(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body

def audit_receivers():
    from django.db.models.signals import post_save

    return sum("chittycan_admin_audit_" in str(lookup[0]) for lookup, *_ in post_save.receivers)

async def main():
    out = {"admin_at_start": "tenants.admin" in sys.modules, "audit_at_start": audit_receivers()}
    for path in ("/healthz", "/readyz", "/metrics"):
        status, body = await get(path)
        out[path] = [status, body.decode()[:2000]]
    out["urlconf_after_probes"] = "chittycan.urls" in sys.modules
    status, _ = await get("/healthz", "POST")  # not a probe method: Django answers (its CSRF check)
    out["post"] = status
    out["urlconf_after_post"] = "chittycan.urls" in sys.modules
    from django.contrib import admin

    out["admin_after_post"] = sorted(m._meta.label for m in admin.site._registry)
    out["audit_after_post"] = audit_receivers()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_probes_are_answered_without_loading_the_urlconf(tmp_path: Path, transactional_db) -> None:
    """An orchestrator's probes (GET /healthz, /readyz, /metrics) never make a serving gateway load
    Django's URLconf and what it imports (the admin, the REST and management APIs); another method
    on the same path still reaches Django's view. The admin's modules are not imported at start
    either: the URLconf registers them, and connects the admin's audit receivers."""
    env = base_env(tmp_path, SECRET_KEY=STRONG_SECRET, CHITTYCAN_SERVING="uvicorn")
    result = subprocess.run(
        [sys.executable, "-c", _PROBE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert out["/healthz"] == [200, '{"status":"ok"}']
    status, body = out["/readyz"]
    assert status == 200 and orjson.loads(body)["status"] == "ready", body
    status, body = out["/metrics"]
    assert status == 200 and "# HELP chittycan_" in body, body
    assert out["urlconf_after_probes"] is False
    assert out["post"] == 403  # a POST without a CSRF token, refused by Django's middleware
    assert out["urlconf_after_post"] is True
    # The admin's modules come with the URLconf, not at start; then the admin is whole, audited.
    assert out["admin_at_start"] is False and out["audit_at_start"] == 0
    assert {"tenants.Tenant", "tenants.ApiKey", "auth.User", "budgets.Budget"} <= set(out["admin_after_post"])
    assert out["audit_after_post"] > 0
