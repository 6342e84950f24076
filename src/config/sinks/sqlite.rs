//! Settings of the `sqlite` sink ([`crate::sink::sqlite`]).

use std::path::PathBuf;

use super::SinkSpec;
use super::sql::quote_table;

super::sink_config! {
    /// `type: sqlite`.
    pub struct Config {
        /// Database file; created when missing.
        pub path: PathBuf,
        /// Table to insert into (`name` or `schema.name`, letters, digits and `_`).
        pub table: String,
        /// Apply mqbridge's own migrations (`migrations/sqlite`, the `mqbridge_messages` table) at start.
        #[serde(default)]
        pub migrate: bool,
    }
}

impl SinkSpec for Config {
    fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        if let Err(e) = quote_table(&self.table) {
            errs.push(("table", e));
        }
        if self.path.as_os_str().is_empty() {
            errs.push(("path", "must not be empty".into()));
        }
        errs
    }
    fn describe(&self) -> String {
        format!("sqlite {} table {}", self.path.display(), self.table)
    }
}
