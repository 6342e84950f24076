-- Dead letters: records or messages that could not be delivered, with the reason.
-- Point `dead_letter: { sink: NAME }` at a postgres sink with `table: mqbridge_dead_letters`.
CREATE TABLE IF NOT EXISTS mqbridge_dead_letters (
    id               BIGSERIAL PRIMARY KEY,
    message_id       TEXT,
    topic            TEXT        NOT NULL,
    payload          TEXT,
    payload_encoding TEXT        NOT NULL,
    qos              SMALLINT    NOT NULL,
    retain           BOOLEAN     NOT NULL DEFAULT FALSE,
    source           TEXT,
    rule             TEXT,
    sink             TEXT,
    error_kind       TEXT        NOT NULL,
    error            TEXT        NOT NULL,
    attempts         INTEGER     NOT NULL,
    first_attempt_at TIMESTAMPTZ,
    last_attempt_at  TIMESTAMPTZ,
    record           JSONB,
    received_at      TIMESTAMPTZ NOT NULL,
    stored_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS mqbridge_dead_letters_time ON mqbridge_dead_letters (stored_at);
