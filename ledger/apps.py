from django.apps import AppConfig


class LedgerConfig(AppConfig):
    name = "ledger"
    verbose_name = "Usage ledger"

    def ready(self) -> None:
        # Probe rows expire with the usage ledger's retention (ledger.retention's task).
        from ledger import probes, retention  # noqa: PLC0415  (app registry not ready at module import)

        retention.also_prune("probe_records", probes.prune)
