-- The chamber, schema version 3: routing by facility and Z-segments (issue 6).
-- Applied after upgrade-v1-v2.sql to a new chamber, or on its own to a version-2 chamber, in one transaction.

-- The facility that published a schedule: MSH-4.1 (sending facility) of the SIU or SQR^S25 that last
-- described it ('' when the HIS leaves MSH-4 empty, and for schedules stored before version 3). Routes with
-- a `facility` send the bookings of a schedule to that facility's HIS endpoint.
ALTER TABLE schedules ADD COLUMN facility TEXT NOT NULL DEFAULT '';

-- The HIS's Z-segments that came with the slot's last publication (SIU^S23/S24, or an SQR^S25 group that
-- says Open/Blocked), as ER7 text with their escapes, separated by CR; NULL when there were none, or the
-- endpoint does not pass them (pass_z_segments). Served as extensions on the FHIR Slot. Notices about a
-- patient's appointment (S12..S17, S26) never write them.
ALTER TABLE slots ADD COLUMN z_segments TEXT;
