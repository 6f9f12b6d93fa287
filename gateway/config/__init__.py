"""The configuration: the schema engine (schema, fields, errors, reference: file:line:col errors, unknown keys
refused) and the typed model (model, with the gates' sections in inner and outer)."""
