"""Primitives every app may use and that import nothing of ours: the bottom of the import graph.

- ``core.invalidation``: the registry caches subscribe to; configuration writers announce changes.
- ``core.backoff``: the one exponential-backoff-with-jitter rule.
- ``core.egress``: where stored outbound URLs (webhooks, provider base URLs) may go (docs/security.md).
- ``core.preflight``: what a server checks before serving (a real SECRET_KEY, ``check --deploy``).
"""
