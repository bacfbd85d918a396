"""Delivery: the scheduler (``scheduler``), one attempt (``attempt``), what an answer means
(``classify``, with the admin ``hints``), what to do about it (``decision``), holds, pauses and probes
(``holds``), pacing (``pacing``) and bounces (``dsn``). Reaches Microsoft only through the
``SubmitsMessages`` protocol; imports the foundation, intake and the queue, never relay.microsoft.
See docs/architecture.md, "Layout".
"""
