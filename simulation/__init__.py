"""fedseg: simulation."""
