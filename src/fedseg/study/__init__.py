"""``fedseg study``: profiles, resumable steps, report."""
