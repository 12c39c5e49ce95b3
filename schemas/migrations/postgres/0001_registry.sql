CREATE TABLE IF NOT EXISTS registry_schemas (
    id BIGINT PRIMARY KEY NOT NULL,
    canonical TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS registry_versions (
    subject TEXT NOT NULL,
    version BIGINT NOT NULL,
    schema_id BIGINT NOT NULL REFERENCES registry_schemas (id),
    deleted BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, version)
);
CREATE TABLE IF NOT EXISTS registry_config (
    subject TEXT PRIMARY KEY NOT NULL,
    level TEXT NOT NULL
);
