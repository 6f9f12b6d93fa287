-- The chamber, schema version 5, on PostgreSQL: ../upgrade-v4-v5.sql (an inbound message is known by its
-- sender and its control id). PostgreSQL changes the unique constraint in place. SQLite's file reads each
-- stored inbound message's sender from its bytes; a PostgreSQL chamber is never older than version 9 (the
-- first that runs on PostgreSQL), so it holds none: one that did would be refused here, not guessed.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM messages WHERE direction = 'inbound') THEN
        RAISE EXCEPTION 'a version-4 chamber on PostgreSQL with inbound messages: not supported (none was ever made)';
    END IF;
END $$;
ALTER TABLE messages ADD COLUMN sender TEXT NOT NULL DEFAULT '';
ALTER TABLE messages DROP CONSTRAINT messages_identity;
ALTER TABLE messages ADD CONSTRAINT messages_identity UNIQUE (direction, peer, sender, control_id);
