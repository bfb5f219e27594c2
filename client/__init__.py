"""fedseg: client."""
