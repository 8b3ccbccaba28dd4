"""Admin for the Stripe export: run an export for a period, list runs, download the CSV."""

from __future__ import annotations

import csv
import io
import zipfile
from datetime import UTC, datetime

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from billing_export.models import ExportLine, ExportRun
from tests.test_billing_export import HEADER, add_rows


@pytest.fixture
def staff_client(client, settings, transactional_db):
    settings.CHITTYCAN_ADMIN_REQUIRE_OTP = False
    user = get_user_model().objects.create_superuser("boss", "boss@example.com", "pw-not-used-here")
    client.force_login(user)
    return client


def test_admin_runs_an_export_and_downloads_the_csv(staff_client, make_tenant):
    acme = make_tenant("acme", stripe_customer_id="cus_ACME0001")
    orphan = make_tenant("orphan")
    add_rows(acme, [(datetime(2026, 10, 4, 1, tzinfo=UTC), 4321), (datetime(2026, 10, 4, 2, tzinfo=UTC), 9)])
    add_rows(orphan, [(datetime(2026, 10, 4, 3, tzinfo=UTC), 50)])

    changelist = reverse("admin:billing_export_exportrun_changelist")
    page = staff_client.get(changelist)
    assert page.status_code == 200
    run_url = reverse("admin:billing_export_exportrun_run")
    assert run_url in page.content.decode()

    bad = staff_client.post(run_url, {"period": "2026/10"})
    assert bad.status_code == 200 and "period must be YYYY-MM" in bad.content.decode()
    assert not ExportRun.objects.exists()

    done = staff_client.post(run_url, {"period": "2026-10", "granularity": "day"}, follow=True)
    assert done.status_code == 200
    run = ExportRun.objects.get()
    body = done.content.decode()
    assert "1 new line(s)" in body and "Download the CSV" in body and "orphan" in body
    assert run.actor_label == "admin:boss" and run.total_micro == 4330

    listing = staff_client.get(changelist).content.decode()
    download_url = reverse("admin:billing_export_exportrun_download", args=[run.pk])
    assert download_url in listing and "orphan" in listing

    response = staff_client.get(download_url)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert f"run{run.pk}.csv" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0] == HEADER
    assert rows[1][1:] == [
        str(int(datetime(2026, 10, 4, tzinfo=UTC).timestamp())),
        "llm_cost_microusd",
        "cus_ACME0001",
        "4330",
    ]

    # "export again" adds nothing; the download action zips several runs
    again = staff_client.post(changelist, {"action": "export_again", "_selected_action": [run.pk]}, follow=True)
    assert "0 new line(s)" in again.content.decode()
    assert ExportRun.objects.count() == 2 and ExportLine.objects.count() == 1
    zipped = staff_client.post(
        changelist, {"action": "download_csv", "_selected_action": list(ExportRun.objects.values_list("pk", flat=True))}
    )
    assert zipped["Content-Type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()
    assert len(names) == 2

    # runs and lines cannot be deleted (that would make rows billable again)
    delete = staff_client.get(reverse("admin:billing_export_exportrun_delete", args=[run.pk]))
    assert delete.status_code == 403
    line = ExportLine.objects.get()
    assert staff_client.get(reverse("admin:billing_export_exportline_change", args=[line.pk])).status_code == 200


def test_admin_export_views_need_staff(client, transactional_db):
    response = client.get(reverse("admin:billing_export_exportrun_run"))
    assert response.status_code == 302 and "/login/" in response["Location"]
