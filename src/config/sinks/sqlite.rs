//! Settings of the `sqlite` sink ([`crate::sink::sqlite`]).

use std::path::PathBuf;

use super::sql::Table;
use super::{Common, HasCommon, Problems, SinkSpec};

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

/// The `sqlite` sink's settings, validated.
#[derive(Debug)]
pub struct Settings {
    pub path: PathBuf,
    pub table: Table,
    pub migrate: bool,
    pub common: Common,
}

impl Config {
    /// Validates the settings.
    pub fn compile(self) -> Result<Settings, Problems> {
        let mut errs = Problems::new();
        let table = Table::parse(&self.table);
        if let Err(e) = &table {
            errs.push(("table".into(), e.clone()));
        }
        if self.path.as_os_str().is_empty() {
            errs.push(("path".into(), "must not be empty".into()));
        }
        match table {
            Ok(table) if errs.is_empty() => Ok(Settings {
                common: self.common(),
                path: self.path,
                table,
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
        format!("sqlite {} table {}", self.path.display(), self.table)
    }
}
