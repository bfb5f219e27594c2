"""fedseg: serving."""
