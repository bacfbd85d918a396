"""Intake: the SMTP listener and everything that judges what a client sends before it is queued.

The listener (aiosmtpd, with our overrides gathered in ``aiosmtpd_compat``), what one client may take
(``limits``), client authentication (``auth``, ``passwords``), the listeners' TLS (``tls``), DATA
framing (``data``), the relay policy and address checks (``policy``, ``addresses``), header rewriting
(``rewrite``) and the listener's own reply texts (``replies``). Intake hands accepted
mail on through the ``Intake`` and ``BodySink`` protocols; it imports nothing from the later stages.
See docs/architecture.md, "Layout".
"""
