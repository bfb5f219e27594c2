"""fedseg: server."""
