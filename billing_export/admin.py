"""Admin for the Stripe export: runs (run an export for a period, download its CSV, push it) and lines.

Runs, lines and marks are never deleted from the admin: deleting them would make ledger rows
billable a second time.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html

from billing_export import selectors, services
from billing_export.models import ExportLine, ExportRun, Granularity
from billing_export.stripe_api import StripeNotConfigured


def _usd(micro: int) -> str:
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{'-' if micro < 0 else ''}${whole:,}.{frac:06d}"


class RunExportForm(forms.Form):
    period = forms.CharField(help_text="YYYY-MM (a month) or YYYY-MM-DD (a day), UTC")
    granularity = forms.ChoiceField(
        choices=[("", "default (CHITTYCAN_STRIPE_AGGREGATION)"), *Granularity.choices], required=False
    )
    event_name = forms.CharField(required=False, help_text="Empty: CHITTYCAN_STRIPE_METER_EVENT")

    def clean_period(self) -> str:
        value: str = self.cleaned_data["period"].strip()
        try:
            services.parse_period(value)
        except services.ExportError as exc:
            raise forms.ValidationError(str(exc)) from exc
        return value


def _csv_filename(run: ExportRun, part: int | None = None) -> str:
    suffix = f"-{part:03d}" if part else ""
    return f"stripe-meter-events-{run.period}-run{run.pk}{suffix}.csv"


def _csv_response(runs: list[ExportRun]) -> HttpResponse:
    files: list[tuple[str, bytes]] = []
    for run in runs:
        parts = services.export_csv_parts(selectors.run_lines(run))
        if len(parts) == 1:
            files.append((_csv_filename(run), parts[0]))
        else:
            files += [(_csv_filename(run, i), data) for i, data in enumerate(parts, 1)]
    if len(files) == 1:
        name, data = files[0]
        response = HttpResponse(data, content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            archive.writestr(name, data)
    response = HttpResponse(buf.getvalue(), content_type="application/zip")
    response["Content-Disposition"] = 'attachment; filename="stripe-meter-events.zip"'
    return response


@admin.register(ExportRun)
class ExportRunAdmin(admin.ModelAdmin):
    change_list_template = "admin/billing_export/exportrun/change_list.html"
    list_display = (
        "id",
        "period",
        "granularity",
        "event_name",
        "status",
        "lines_count",
        "total",
        "not_exported",
        "created_at",
        "actor_label",
        "download",
    )
    list_filter = ("status", "granularity", "period")
    search_fields = ("period", "event_name")
    date_hierarchy = "created_at"
    actions = ["download_csv", "push_to_stripe", "export_again"]

    def get_readonly_fields(self, request: HttpRequest, obj: ExportRun | None = None) -> list[str]:
        return [f.name for f in ExportRun._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ExportRun | None = None) -> bool:
        return False

    @admin.display(description="total")
    def total(self, run: ExportRun) -> str:
        return _usd(run.total_micro)

    @admin.display(description="not exported (no customer)")
    def not_exported(self, run: ExportRun) -> str:
        if not run.unmapped:
            return "-"
        slugs = ", ".join(u["slug"] for u in run.unmapped)
        return f"{len(run.unmapped)} tenant(s), {_usd(run.unmapped_micro)}: {slugs}"

    @admin.display(description="CSV")
    def download(self, run: ExportRun) -> str:
        if run.status != ExportRun.Status.DONE:
            return "-"
        url = reverse("admin:billing_export_exportrun_download", args=[run.pk])
        return format_html('<a href="{}">download</a>', url)

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                "run-export/",
                self.admin_site.admin_view(self.run_export_view),
                name="billing_export_exportrun_run",
            ),
            path(
                "<int:pk>/download/",
                self.admin_site.admin_view(self.download_view),
                name="billing_export_exportrun_download",
            ),
        ]
        return own + super().get_urls()

    def run_export_view(self, request: HttpRequest) -> HttpResponseBase:
        if not self.has_change_permission(request):
            return HttpResponse("Forbidden", status=403)
        form = RunExportForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                run = services.export_run_create(
                    period=form.cleaned_data["period"],
                    granularity=form.cleaned_data["granularity"] or None,
                    event_name=form.cleaned_data["event_name"] or None,
                    actor_label=f"admin:{request.user.get_username()}",
                )
            except services.ExportError as exc:
                self.message_user(request, f"Export failed, nothing was billed: {exc}", messages.ERROR)
            else:
                self._announce(request, run)
                return HttpResponseRedirect(reverse("admin:billing_export_exportrun_changelist"))
        context = {
            **self.admin_site.each_context(request),
            "title": "Run a Stripe export",
            "form": form,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/billing_export/exportrun/run_export.html", context)

    def download_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        if not self.has_view_permission(request):
            return HttpResponse("Forbidden", status=403)
        run = get_object_or_404(ExportRun, pk=pk, status=ExportRun.Status.DONE)
        return _csv_response([run])

    def _announce(self, request: HttpRequest, run: ExportRun) -> None:
        url = reverse("admin:billing_export_exportrun_download", args=[run.pk])
        self.message_user(
            request,
            format_html(
                'Export run {}: {} new line(s), {} ({} ledger rows). <a href="{}">Download the CSV</a>.',
                run.pk,
                run.lines_count,
                _usd(run.total_micro),
                run.rows_count,
                url,
            ),
            messages.SUCCESS,
        )
        for warning in run.warnings:
            self.message_user(request, warning, messages.WARNING)

    @admin.action(description="Download CSV of the selected runs")
    def download_csv(self, request: HttpRequest, queryset: QuerySet[ExportRun]) -> HttpResponse | None:
        runs = list(queryset.filter(status=ExportRun.Status.DONE).order_by("id"))
        if not runs:
            self.message_user(request, "No finished run selected.", messages.WARNING)
            return None
        return _csv_response(runs)

    @admin.action(description="Export again: bill rows that arrived since (same periods)", permissions=["change"])
    def export_again(self, request: HttpRequest, queryset: QuerySet[ExportRun]) -> None:
        for period, granularity, event in sorted(set(queryset.values_list("period", "granularity", "event_name"))):
            try:
                run = services.export_run_create(
                    period=period,
                    granularity=granularity,
                    event_name=event,
                    actor_label=f"admin:{request.user.get_username()}",
                )
            except services.ExportError as exc:
                self.message_user(request, f"{period}: export failed, nothing was billed: {exc}", messages.ERROR)
            else:
                self._announce(request, run)

    @admin.action(description="Push the selected runs to Stripe (meter events)", permissions=["change"])
    def push_to_stripe(self, request: HttpRequest, queryset: QuerySet[ExportRun]) -> None:
        lines = ExportLine.objects.filter(run__in=queryset, run__status=ExportRun.Status.DONE).order_by("id")
        try:
            result = services.export_run_push(lines=lines)
        except StripeNotConfigured as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        level = messages.SUCCESS if result.ok else messages.ERROR
        self.message_user(
            request,
            f"Pushed: {result.accepted} accepted, {result.duplicates} already at Stripe, "
            f"{result.already_accepted} previously accepted, {result.failed} failed, {result.stale} stale "
            f"(older than 35 days). {result.stopped}",
            level,
        )
        for error in result.errors[:20]:
            self.message_user(request, error, messages.ERROR)


@admin.register(ExportLine)
class ExportLineAdmin(admin.ModelAdmin):
    list_display = (
        "identifier",
        "run",
        "customer_id",
        "tenant_slug",
        "bucket_start",
        "value",
        "rows_count",
        "seq",
        "push_status",
        "pushed_at",
    )
    list_filter = ("push_status", "granularity", "event_name")
    search_fields = ("identifier", "customer_id", "tenant_slug")
    list_select_related = ("run",)
    raw_id_fields = ("run", "tenant")

    def get_readonly_fields(self, request: HttpRequest, obj: ExportLine | None = None) -> list[str]:
        return [f.name for f in ExportLine._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
