from django.apps import AppConfig
from django.conf import settings

from gateway import tracing


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"

    def ready(self) -> None:
        # The ledger's analytics price cache hits with the gateway's price table (ledger never
        # imports gateway). Imported here, not at the top: they import models, and the app
        # registry is not ready while this module is imported.
        from gateway import pricing  # noqa: PLC0415  (app registry not ready at module import)
        from ledger import analytics  # noqa: PLC0415  (app registry not ready at module import)

        analytics.use_price_history(pricing.price_history)

        # Stored Responses API answers expire with the retention task's run (ledger.retention).
        from gateway import responses_store  # noqa: PLC0415  (app registry not ready at module import)
        from ledger import retention  # noqa: PLC0415  (app registry not ready at module import)

        retention.also_prune("stored_responses", responses_store.prune_expired)

        # Registers the embedded scheduler with the background tasks a gateway process starts
        # on its first request (it runs only when CHITTYCAN_EMBEDDED_SCHEDULER is on).
        from gateway import scheduler  # noqa: F401, PLC0415  (app registry not ready at module import)

        # OpenTelemetry traces: on or off for this process (the exporter starts on first use).
        tracing.configure(settings.CHITTYCAN_TRACING)
