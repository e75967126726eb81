"""Adapters that turn other libraries' objects into fpsolve systems.

Each integration lives in its own subpackage and imports its library only when it is used, so
that fpsolve's plugin loading stays cheap: ``fpsolve.integrations.diffusers`` for diffusers
schedulers and pipelines.
"""
