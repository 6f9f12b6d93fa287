-- The chamber, schema version 7: what the inner gate's probe last found of each HIS endpoint (issue 18).
-- Applied after upgrade-v5-v6.sql to a new chamber, or on its own to a version-6 chamber, in one transaction.

-- One row per HIS endpoint the probe has checked, written when what it finds changes (up -> down or back), so
-- the split lock's outer gate (a booking for a HIS known to be down is answered at once) and `gatewayd status`
-- (beside a running gateway or without one) read the same truth. up: 1 or 0; since: when it became so;
-- detail: why it is down (the probe's error, never message contents), NULL while up.
CREATE TABLE his_links (
    peer   TEXT PRIMARY KEY,
    up     INTEGER NOT NULL CHECK (up IN (0, 1)),
    since  REAL NOT NULL,
    detail TEXT
);
