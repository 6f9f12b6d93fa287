-- The chamber, schema version 6: a platform's prescription keeps the gateway's own record of it (issue 16).
-- Applied after upgrade-v4-v5.sql to a new chamber, or on its own to a version-5 chamber, in one transaction.

-- record: the prescription as the gateway's own JSON (gateway.domain.prescriptions.Prescription.to_json),
-- written by the outer gate with the prescription. The inner gate writes the order (RDE^O11 / OMP^O09) from it
-- on the first send, so nothing reads the platform's FHIR a second time. NULL for released prescriptions, and for
-- those committed before version 6: an order of theirs not yet written when the chamber was upgraded cannot be
-- written (docs/prescriptions.md, section 2).
ALTER TABLE prescriptions ADD COLUMN record TEXT;
