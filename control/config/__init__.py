"""Configuration as code: ``can apply -f chittycan.yaml`` and ``can export``.

The file describes providers, public models (aliases, deployments, prices), plans and tenants
(hierarchy, limits, budgets): the same objects the admin edits. The format is in docs/config.md.

- ``schema``: the typed document and every check on it.
- ``load``: YAML (with ``${ENV}`` interpolation) to a validated ``schema.Document``.
- ``apply``: make the database match a document in one transaction, through the service
  functions the admin, the CLI and the REST API use.
- ``export``: the current configuration as a document; ``export -> apply`` is a no-op.
"""
