"""fedseg: imaging."""
