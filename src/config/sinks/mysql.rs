//! Settings of the `mysql` sink ([`crate::sink::mysql`], MariaDB and MySQL): its URL, and
//! the table settings every SQL table sink shares ([`super::sql`]).

use super::sql::{Insert, check_url, redacted};
use super::{Common, HasCommon, Problems, SinkSpec};

super::sql::table_sink_config! {
    /// `type: mysql` (MariaDB or MySQL).
    pub struct Config {
        /// `mysql://user[:password]@host[:port]/database[?ssl-mode=required]` (also
        /// `mariadb://`); keep the password in `${ENV}`.
        pub url: String,
    }
}

/// The `mysql` sink's settings, compiled. `Debug` shows the URL without its password.
pub struct Settings {
    /// Holds the password: show it [`redacted`].
    pub url: String,
    pub insert: Insert,
    pub common: Common,
}

impl Config {
    /// Validates the settings and compiles the `columns:` programs.
    pub fn compile(self) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        check_url(&self.url, &["mysql", "mariadb"], &mut errs);
        let common = self.common();
        let insert = self.insert(&mut errs);
        match insert {
            Some(insert) if errs.is_empty() => Ok(Settings {
                common,
                url: self.url,
                insert,
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
            "mysql {} table {}{}",
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
            .field("common", &self.common)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_password_is_never_shown() {
        let cfg: Config =
            serde_json::from_value(json!({"url": "mysql://u:hunter2@h:3306/db", "table": "t"}))
                .unwrap();
        let settings = cfg.compile().unwrap();
        assert!(!settings.describe().contains("hunter2"));
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn bad_settings_name_their_field() {
        let cfg: Config = serde_json::from_value(json!({
            "url": "postgres://h/db", "table": "a;b",
            "columns": {"x y": "."}, "on_conflict": {"key": [], "action": "ignore"}
        }))
        .unwrap();
        let fields: Vec<String> = cfg
            .compile()
            .unwrap_err()
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(fields, ["url", "table", "columns", "on_conflict"]);
    }

    #[test]
    fn check_says_the_table_is_created_on_demand() {
        let cfg: Config = serde_json::from_value(json!({
            "url": "mysql://h/db", "table": "t",
            "create": {"columns": {"a": "BIGINT"}}, "add_columns": true
        }))
        .unwrap();
        assert_eq!(
            cfg.compile().unwrap().describe(),
            "mysql mysql://h/db table t (created when missing, columns added for new keys)"
        );
    }

    /// Every field the sink reads (as it serializes back) is a property of its variant in
    /// the JSON schema, and the schema has no other.
    #[test]
    fn the_schema_has_every_setting() {
        let properties = crate::config::sinks::schema_properties_are_the_settings(
            "{type: mysql, url: mysql://h/db, table: t, columns: {a: .a}, unknown_keys: ignore, \
             time_unit: ms, on_conflict: {key: [a], action: update}, \
             create: {columns: {a: BIGINT}, primary_key: [a]}, add_columns: false}",
            "mysql",
        );
        for key in [
            "url",
            "table",
            "columns",
            "unknown_keys",
            "time_unit",
            "on_conflict",
            "create",
            "add_columns",
        ] {
            assert!(properties.iter().any(|p| p == key), "{key}");
        }
    }
}
