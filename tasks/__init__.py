"""Pipeline steps, one module each, numbered like the plan (see each module's docstring)."""
