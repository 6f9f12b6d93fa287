-- The chamber, schema version 8: platforms' subscriptions and the notifications they are owed (issue 23).
-- Applied after upgrade-v6-v7.sql to a new chamber, or on its own to a version-7 chamber, in one transaction.

-- A platform's subscription (FHIR Subscriptions R5 Backport for R4): a topic, a payload kind, nothing else from
-- the request.  The endpoint is never stored here: it is the platform's in the YAML (platforms[].notify), so no
-- request can point the gateway anywhere.  status: active | off (deleted by the platform; kept while
-- notifications of it are undelivered).  events: the event number of its latest notification
-- (eventsSinceSubscriptionStart).  heartbeat: seconds without a delivery after which the gateway sends a
-- heartbeat (the backport-heartbeat-period extension), NULL for none.
CREATE TABLE subscriptions (
    id        TEXT PRIMARY KEY,
    platform  TEXT NOT NULL,
    topic     TEXT NOT NULL,
    payload   TEXT NOT NULL CHECK (payload IN ('empty', 'id-only', 'full-resource')),
    status    TEXT NOT NULL CHECK (status IN ('active', 'off')),
    events    INTEGER NOT NULL DEFAULT 0,
    heartbeat REAL,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE INDEX subscriptions_by_platform ON subscriptions (platform, topic, status);

-- A notification a subscription is owed, committed in the transaction of the change that caused it.
-- event: its number in the subscription (1, 2, ...; a platform that sees a gap asks $events); 0 is the
-- subscription's handshake (what 'handshake'), sent before any event.
-- focus: the resource it is about ('Appointment/<id>'); what: the change (e.g. 'cancelled'), never a patient.
-- state: pending -> delivered | dead (past the platform's notify.give_up_after: operators see it).
CREATE TABLE notifications (
    subscription_id TEXT NOT NULL REFERENCES subscriptions (id),
    event           INTEGER NOT NULL,
    platform        TEXT NOT NULL,
    focus           TEXT NOT NULL,
    what            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt    REAL NOT NULL,
    last_error      TEXT,
    created         REAL NOT NULL,
    updated         REAL NOT NULL,
    PRIMARY KEY (subscription_id, event)
);
CREATE INDEX notifications_pending ON notifications (state, next_attempt);
