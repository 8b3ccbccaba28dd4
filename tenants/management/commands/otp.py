"""``can otp enrol|list|remove --user NAME``: the admin's TOTP second factor (django-otp)."""

from __future__ import annotations

import io
from typing import Any

import segno
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django_otp.plugins.otp_totp.models import TOTPDevice

from tenants import audit


class Command(BaseCommand):
    help = "Enrol, list and remove the TOTP authenticators staff use to log in to the admin."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{enrol,list,remove}")
        enrol = sub.add_parser("enrol", help="create a TOTP device; print its otpauth:// URL and a QR code")
        enrol.add_argument("--user", required=True, metavar="NAME")
        enrol.add_argument("--name", default="authenticator", help="a label for the device")
        enrol.add_argument("--replace", action="store_true", help="remove the user's other TOTP devices first")
        enrol.add_argument("--no-qr", action="store_true", help="print only the URL")
        listing = sub.add_parser("list", help="list TOTP devices")
        listing.add_argument("--user", metavar="NAME", default="")
        remove = sub.add_parser("remove", help="remove a user's TOTP devices")
        remove.add_argument("--user", required=True, metavar="NAME")

    def handle(self, *args: Any, **opts: Any) -> None:
        getattr(self, f"_{opts['action']}")(opts)

    def _user(self, name: str) -> Any:
        user_model = get_user_model()
        user = user_model.objects.filter(**{user_model.USERNAME_FIELD: name}).first()
        if user is None:
            raise CommandError(f"no user {name!r} (create one: can createsuperuser)")
        return user

    def _enrol(self, opts: dict[str, Any]) -> None:
        user = self._user(opts["user"])
        if not user.is_staff:
            self.stderr.write(f"note: {opts['user']} is not staff, so cannot use the admin yet")
        if opts["replace"]:
            TOTPDevice.objects.filter(user=user).delete()
        device = TOTPDevice.objects.create(user=user, name=opts["name"], confirmed=True)
        audit.record("otp.enrol", target=user.get_username(), data={"device": device.pk}, actor_label="cli")
        url = device.config_url
        self.stdout.write(f"Scan this with an authenticator app (or paste the URL) for {user.get_username()}:\n")
        if not opts["no_qr"]:
            buf = io.StringIO()
            segno.make(url, error="m").terminal(out=buf, compact=True)
            self.stdout.write(buf.getvalue())
        self.stdout.write(url)
        self.stderr.write("It is shown once. Log in to /admin/ with your password and the 6-digit code.")

    def _list(self, opts: dict[str, Any]) -> None:
        qs = TOTPDevice.objects.select_related("user").order_by("user_id", "id")
        if opts["user"]:
            qs = qs.filter(user=self._user(opts["user"]))
        rows = list(qs)
        if not rows:
            self.stderr.write("no TOTP devices")
            return
        for device in rows:
            state = "confirmed" if device.confirmed else "unconfirmed"
            last = device.last_used_at.strftime("%Y-%m-%d %H:%M %Z") if device.last_used_at else "never used"
            self.stdout.write(f"{device.user.get_username()}  {device.name}  {state}  {last}")

    def _remove(self, opts: dict[str, Any]) -> None:
        user = self._user(opts["user"])
        count, _ = TOTPDevice.objects.filter(user=user).delete()
        audit.record("otp.remove", target=user.get_username(), data={"devices": count}, actor_label="cli")
        self.stdout.write(f"removed {count} TOTP device(s) of {user.get_username()}")
