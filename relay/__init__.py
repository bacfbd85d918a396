"""oauth-smtp-relay: plain SMTP in, Exchange Online out with app-only OAuth 2.0 (XOAUTH2)."""

__version__ = "0.1.0"
