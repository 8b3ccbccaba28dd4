"""Routing: which deployments serve a public model name.

``table`` holds the in-process snapshot of models, deployments and prices (reloaded on
invalidation), dev mode's and passthrough mode's routes; ``breaker`` the circuit breaker of each
deployment and the retry budget; ``policy`` the routing policies (CEL rules, compiled into the
table), ``strategy`` the load-balancing orders, ``latency`` each deployment's recent latency.
"""
