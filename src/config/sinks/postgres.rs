//! Settings of the `postgres` sink ([`crate::sink::postgres`]): its URL and migrations,
//! and the table settings every SQL table sink shares ([`super::sql`]).

use super::sql::{Insert, check_url, redacted};
use super::{Common, HasCommon, Problems, SinkSpec};

super::sql::table_sink_config! {
    /// `type: postgres`.
    pub struct Config {
        /// `postgres://user[:password]@host[:port]/database[?sslmode=require]`; keep the
        /// password in `${ENV}`.
        pub url: String,
        /// Apply mqbridge's own migrations (`migrations/postgres`: `mqbridge_messages`,
        /// `mqbridge_dead_letters`) at start.
        #[serde(default)]
        pub migrate: bool,
    }
}

/// The `postgres` sink's settings, compiled. `Debug` shows the URL without its password.
pub struct Settings {
    /// Holds the password: show it [`redacted`].
    pub url: String,
    pub insert: Insert,
    pub migrate: bool,
    pub common: Common,
}

impl Config {
    /// Validates the settings and compiles the `columns:` programs.
    pub fn compile(self) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        check_url(&self.url, &["postgres", "postgresql"], &mut errs);
        let common = self.common();
        let insert = self.insert(&mut errs);
        match insert {
            Some(insert) if errs.is_empty() => Ok(Settings {
                common,
                url: self.url,
                insert,
                migrate: self.migrate,
            }),
            _ => Err(errs),
        }
    }
}

impl HasCommon for Settings {
    fn common(&self) -> Common {
        self.common
    }
}

impl SinkSpec for Settings {
    fn describe(&self) -> String {
        format!(
            "postgres {} table {}{}",
            redacted(&self.url),
            self.insert.table,
            self.insert.on_demand()
        )
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &redacted(&self.url))
            .field("insert", &self.insert)
            .field("migrate", &self.migrate)
            .field("common", &self.common)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redacted("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        let cfg: Config =
            serde_json::from_value(json!({"url": "postgres://u:pw@h/db", "table": "t"})).unwrap();
        let settings = cfg.compile().unwrap();
        assert!(!settings.describe().contains("pw"));
        assert!(!format!("{settings:?}").contains("pw"));
    }

    /// Every field the sink reads is a property of its variant in the JSON schema, and
    /// the schema has no other; `create:` names its field in errors.
    #[test]
    fn the_schema_has_every_setting_and_create_errors_name_their_field() {
        let properties = crate::config::sinks::schema_properties_are_the_settings(
            "{type: postgres, url: postgres://h/db, table: t, migrate: true, \
             create: {columns: {ts: timestamptz, v: double precision}, primary_key: [ts]}, \
             add_columns: true, unknown_keys: error}",
            "postgres",
        );
        for key in ["create", "add_columns", "migrate", "on_conflict"] {
            assert!(properties.iter().any(|p| p == key), "{key}");
        }
        let cfg: Config = serde_json::from_value(json!({
            "url": "postgres://h/db", "table": "t",
            "create": {"columns": {"x": "text; drop table t"}, "primary_key": ["id"]}
        }))
        .unwrap();
        let fields: Vec<String> = cfg
            .compile()
            .unwrap_err()
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(fields, ["create.columns.x", "create.primary_key"]);
    }
}
