"""The queue: the durable spool (``spool``), its group committer (``committer``) and the
``oauth-smtp-relay queue`` command (``cli``). Imports the foundation and intake's shapes only.
See docs/architecture.md, "Layout".
"""
