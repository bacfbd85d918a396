"""The queue: the durable spool behind its facade ``spool.Spool`` (the rooms behind it: ``entries``,
``schema``, ``table``, ``bodies``, ``recovery``, ``owner``, ``problems``), its group committer
(``committer``) and the ``oauth-smtp-relay queue`` command (``cli``). Imports the foundation and
intake's shapes only. See docs/architecture.md, "Layout".
"""
