"""Prompts and layouts: where each local prompt's tokens sit inside the global prompt
(span placement), and the Layout wire type (regions: masks + local prompts + spans)."""
