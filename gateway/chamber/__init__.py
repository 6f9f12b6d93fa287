"""The chamber: the durable store between the gates (SQLite, or PostgreSQL: docs/chamber.md), the only code
with SQL. It knows tables, not FHIR or HL7."""
