-- The chamber, schema version 9: every earlier version of an appointment (issue 17: vread and instance history).
-- Applied after upgrade-v7-v8.sql to a new chamber, or on its own to a version-8 chamber, in one transaction.

-- An appointment as it was before a change: the row of `appointments` (same columns) at that version, copied
-- by Txn.update_appointment in the transaction of the change.  The current version stays in `appointments`;
-- both go when the appointment is pruned (chamber.keep_appointments).  A chamber upgraded from version 8 has
-- only the versions made after the upgrade (earlier ones were never kept: vread says so).
CREATE TABLE appointment_versions (
    id              TEXT NOT NULL,
    version         INTEGER NOT NULL,
    platform        TEXT NOT NULL,
    slot_id         TEXT NOT NULL,
    status          TEXT NOT NULL,
    patient         TEXT NOT NULL,
    description     TEXT,
    his_appointment TEXT,
    hold_expires    REAL,
    outcome         TEXT,
    pending_change  TEXT,
    created         REAL NOT NULL,
    updated         REAL NOT NULL,
    replaces        TEXT,
    PRIMARY KEY (id, version)
) WITHOUT ROWID;
