"""Example application (filled in below)."""
