"""``make bench``: a fast fake OpenAI upstream, a load generator and the orchestration around them.

Nothing here runs in production; see docs/benchmark.md.
"""
