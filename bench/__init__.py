"""Benchmarks of oauth-smtp-relay against the simulated Microsoft 365 and its peers (see README.md)."""
