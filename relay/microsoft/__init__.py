"""Microsoft: Entra ID tokens (``tokens``), the SMTP submission to Exchange Online (``upstream``, with
the pipelined transaction in ``smtp_transaction``), Microsoft Graph (``graph``), the choice between them
(``transport``) and the Exchange admin commands (``exchange_setup``). The last stage of the flow: it may
import every earlier one, and none imports it back (the service wires it in).
See docs/architecture.md, "Layout".
"""
