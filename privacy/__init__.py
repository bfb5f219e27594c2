"""fedseg: privacy."""
