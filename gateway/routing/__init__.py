"""Routing: which deployments serve a public model name.

``table`` holds the in-process snapshot of models, deployments and prices (reloaded on
invalidation), dev mode's and passthrough mode's routes; ``breaker`` the circuit breaker of each
deployment and the retry budget. Routing policies and health (the routing issue) live beside it.
"""
