-- Default table for rules without a transform: one row per message.
-- message_id is stable across redeliveries: use it as the conflict key
-- (on_conflict: { key: [message_id], action: ignore }) to store each message once.
CREATE TABLE IF NOT EXISTS mqbridge_messages (
    id          BIGSERIAL PRIMARY KEY,
    message_id  TEXT UNIQUE,
    topic       TEXT        NOT NULL,
    payload     JSONB,
    qos         SMALLINT    NOT NULL,
    retain      BOOLEAN     NOT NULL DEFAULT FALSE,
    received_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS mqbridge_messages_topic_time ON mqbridge_messages (topic, received_at);
