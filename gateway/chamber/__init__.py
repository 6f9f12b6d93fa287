"""The chamber: the durable store between the gates (SQLite), the only code with SQL. It knows tables, not
FHIR or HL7."""
