-- Default table for rules without a transform: one row per message.
CREATE TABLE IF NOT EXISTS mqbridge_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  TEXT,
    topic       TEXT    NOT NULL,
    payload     TEXT,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL DEFAULT 0,
    received_at TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS mqbridge_messages_topic_time ON mqbridge_messages (topic, received_at);
