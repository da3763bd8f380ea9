-- Schema and demo data of the PostgreSQL side. Safe to run more than once.
-- Docker Compose runs it on first start; `make demo` runs it with psql.

-- The original demo: business rows with a "sent" flag, published by
-- `producer_pg_to_kafka` (flag-table mode) to the topic `user_events`.
CREATE TABLE IF NOT EXISTS user_logins (
    id            bigserial   PRIMARY KEY,
    username      text        NOT NULL,
    event_type    text        NOT NULL,
    event_time    timestamptz NOT NULL DEFAULT now(),
    sent_to_kafka boolean     NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS user_logins_unsent_idx ON user_logins (id) WHERE NOT sent_to_kafka;
-- Wakes the relay at the commit of each insert instead of at its next poll
-- (outbox_pg::flag_notify_sql for the default names; a test keeps it equal).
CREATE OR REPLACE FUNCTION outbox_flag_notify() RETURNS trigger LANGUAGE plpgsql AS $outbox$ BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $outbox$;
DROP TRIGGER IF EXISTS outbox_notify ON "user_logins";
CREATE TRIGGER outbox_notify AFTER INSERT ON "user_logins" FOR EACH STATEMENT EXECUTE FUNCTION outbox_flag_notify('outbox_events:user_logins');

INSERT INTO user_logins (id, username, event_type, event_time) VALUES
    (1, 'alice', 'login',  '2024-05-01 09:00:00+00'),
    (2, 'bob',   'login',  '2024-05-01 09:05:00+00'),
    (3, 'alice', 'logout', '2024-05-01 09:30:00+00'),
    (4, 'carol', 'login',  '2024-05-01 10:00:00+00'),
    (5, 'bob',   'logout', '2024-05-01 10:15:00+00')
ON CONFLICT (id) DO NOTHING;
SELECT setval(pg_get_serial_sequence('user_logins', 'id'), GREATEST((SELECT max(id) FROM user_logins), 1));

-- BEGIN outbox schema (generated from outbox_pg::schema_sql for the default names; a test keeps it equal)
-- Pending events. A row lives from the service's commit until the broker
-- acknowledged it; the relay then deletes it in its claim transaction.
CREATE TABLE IF NOT EXISTS "outbox" (
    seq        bigserial   PRIMARY KEY,
    event_id   uuid        NOT NULL,
    topic      text        NOT NULL,
    key        bytea,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts   integer     NOT NULL DEFAULT 0,
    last_error text,
    -- The lane of the key (of the event id when there is no key): one claim
    -- at a time works a lane, which keeps the order of each key.
    lane       integer     GENERATED ALWAYS AS (((hashtextextended(encode(coalesce(key, uuid_send(event_id)), 'hex'), 0) % 64) + 64) % 64) STORED,
    CONSTRAINT "outbox_event_id_key" UNIQUE (event_id)
);
-- Upgrade of tables created before lanes existed.
ALTER TABLE "outbox" ADD COLUMN IF NOT EXISTS lane integer GENERATED ALWAYS AS (((hashtextextended(encode(coalesce(key, uuid_send(event_id)), 'hex'), 0) % 64) + 64) % 64) STORED;
CREATE INDEX IF NOT EXISTS "outbox_lane_seq_idx" ON "outbox" (lane, seq);
-- A queue table: every row is deleted soon after its insert. Vacuum it after
-- every 10,000 dead rows instead of after 20% of the table, so claims do not
-- step over a growing heap of deleted rows under sustained load.
ALTER TABLE "outbox" SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 10000);

-- Events the broker can never take (too large, invalid), kept with the reason.
CREATE TABLE IF NOT EXISTS "outbox_dead_letter" (
    id               bigserial   PRIMARY KEY,
    event_id         uuid        NOT NULL,
    topic            text        NOT NULL,
    key              bytea,
    payload          bytea       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL,
    reason           text        NOT NULL,
    origin           text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS "outbox_dead_letter_event_id_idx" ON "outbox_dead_letter" (event_id);

-- Which version of this schema the tables are at (one row); a binary
-- refuses to migrate tables of a newer version than it knows.
CREATE TABLE IF NOT EXISTS "outbox_schema_version" (
    version    integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO "outbox_schema_version" (version)
    SELECT 2 WHERE NOT EXISTS (SELECT 1 FROM "outbox_schema_version" WHERE version >= 2);
-- END outbox schema
