-- The chamber, schema version 5: an inbound message is known by its sender and its control id (issue 15).
-- Applied after upgrade-v3-v4.sql to a new chamber, or on its own to a version-4 chamber, in one transaction
-- (gateway/chamber/upgrades.py runs upgrades with foreign keys off and checks them before COMMIT, as SQLite's own
-- procedure for changing a table asks).

-- HL7 v2 makes MSH-10 unique per sender (MSH-3, MSH-4), not across senders: two facilities of one HIS may
-- number their messages alike. sender: MSH-3 and MSH-4 as sent, joined by the message's field separator
-- (e.g. 'HIS|HOSPITAL'); '' for outbound messages (the gateway numbers its own). A UNIQUE constraint cannot
-- be changed in place, so the table is rebuilt, ids kept (message_events and prescriptions point at them).
CREATE TABLE messages_v5 (
    id           INTEGER PRIMARY KEY,
    direction    TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    peer         TEXT NOT NULL,
    sender       TEXT NOT NULL DEFAULT '',
    control_id   TEXT NOT NULL,
    type         TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('committed', 'sending', 'retrying', 'delivered', 'refused',
                                                'dead', 'withdrawn')),
    body         BLOB NOT NULL,
    charset      TEXT NOT NULL,
    subject      TEXT,
    order_key    TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    answer_code  TEXT,
    answer_text  TEXT,
    last_error   TEXT,
    created      REAL NOT NULL,
    updated      REAL NOT NULL,
    UNIQUE (direction, peer, sender, control_id)
);

-- An inbound message's sender, read from its stored bytes: what lies between the end of MSH-2 and the end
-- of MSH-4 (fs = MSH-1, the byte after 'MSH'). Byte-wise, so it matches what gatewayd reads from a new
-- message for any header in ASCII or UTF-8 (a GB18030 header with Chinese in MSH-3/4 may differ: only a
-- resend of a message received before the upgrade could then be taken for a new one).
INSERT INTO messages_v5 (id, direction, peer, sender, control_id, type, state, body, charset, subject,
                         order_key, attempts, next_attempt, answer_code, answer_text, last_error, created,
                         updated)
WITH msh2 AS (  -- from MSH-2 on
    SELECT id, substr(body, 4, 1) AS fs, substr(body, 5) AS rest FROM messages WHERE direction = 'inbound'
), msh3 AS (  -- from MSH-3 on
    SELECT id, fs, substr(rest, instr(rest, fs) + 1) AS rest FROM msh2
), msh4 AS (  -- where MSH-3 ends, and MSH-4 on
    SELECT id, fs, rest, instr(rest, fs) AS end3, substr(rest, instr(rest, fs) + 1) AS after3 FROM msh3
), senders AS (
    SELECT id, CAST(substr(rest, 1, end3 + instr(after3, fs) - 1) AS TEXT) AS sender FROM msh4
)
SELECT m.id, m.direction, m.peer, coalesce(s.sender, ''), m.control_id, m.type, m.state, m.body, m.charset,
       m.subject, m.order_key, m.attempts, m.next_attempt, m.answer_code, m.answer_text, m.last_error,
       m.created, m.updated
FROM messages AS m LEFT JOIN senders AS s ON s.id = m.id;

DROP TABLE messages;
ALTER TABLE messages_v5 RENAME TO messages;
CREATE INDEX messages_by_state ON messages (direction, peer, state, id);
CREATE INDEX messages_by_subject ON messages (subject);
