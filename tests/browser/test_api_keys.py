"""Adding an API key in the browser: the plaintext is on the page the add POST answers with, once,
in no cookie, and it works against /v1."""

from __future__ import annotations

import re

import openai
from playwright.sync_api import BrowserContext, Page, Response, expect

from tenants import keys
from tenants.models import ApiKey, Tenant
from tests.browser.admin_flows import add_key, enrolled_staff, signed_in_as
from tests.fakes.server import ServerThread


def chat(app_server: ServerThread, key: str) -> str:
    client = openai.OpenAI(base_url=f"{app_server.url}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content or ""


def test_new_key_is_shown_once_in_no_cookie_and_works(
    page: Page, context: BrowserContext, responses: list[Response], app_server: ServerThread, upstream: object
) -> None:
    enrolled_staff(page, "kim")
    tenant = Tenant.objects.create(slug="acme", name="Acme")

    plaintext = add_key(page, "acme", "from-browser")
    assert re.fullmatch(r"chitty_[0-9A-Za-z]+", plaintext)
    row = ApiKey.objects.get(name="from-browser")
    assert row.tenant_id == tenant.pk and keys.verify_key(plaintext, row.hashed_secret)

    # The page that shows it is the answer to the POST itself, and no response set it in a cookie.
    posts = [r for r in responses if r.request.method == "POST" and r.url.endswith("/admin/tenants/apikey/add/")]
    assert len(posts) == 1 and posts[0].status == 200 and plaintext in posts[0].text()
    for response in responses:
        for header in response.headers_array():
            if header["name"].lower() == "set-cookie":
                assert plaintext not in header["value"] and row.prefix not in header["value"]
    assert all(plaintext not in cookie["value"] for cookie in context.cookies())

    # Shown once: not on the key's page, not in the list, not after going back to the list.
    page.click(f"text=view key {row.prefix}")
    expect(page.locator("body")).to_contain_text(row.prefix)
    assert plaintext not in page.content()
    page.goto("/admin/tenants/apikey/")
    assert plaintext not in page.content()

    # And it works against /v1.
    assert chat(app_server, plaintext)


def test_autocomplete_endpoint_lists_tenants_for_the_key_form(page: Page, upstream: object) -> None:
    """What the tenant picker on "Add API key" asks the server (HTTP level, in the signed-in session)."""
    enrolled_staff(page, "lee")
    Tenant.objects.create(slug="acme", name="Acme")
    Tenant.objects.create(slug="globex", name="Globex")
    url = "/admin/autocomplete/?app_label=tenants&model_name=apikey&field_name=tenant&term=acm"
    answer = page.request.get(url)
    assert answer.status == 200
    assert answer.json()["results"] == [{"id": str(Tenant.objects.get(slug="acme").pk), "text": "acme"}]
    signed_in_as(page, "lee")
