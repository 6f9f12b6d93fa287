"""The configuration: the schema engine (file:line:col errors, unknown keys refused) and the typed model."""
