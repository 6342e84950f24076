//! Settings of the `file` sink ([`crate::sink::file`]).

use std::path::PathBuf;

use super::{Problems, SinkSpec};

super::sink_config! {
    /// `type: file`.
    pub struct Config {
        /// File to append to; created (with its folder) when missing.
        pub path: PathBuf,
    }
}

/// The `file` sink's settings: as written, once validated (nothing to compile).
pub type Settings = Config;

impl Config {
    /// Validates the settings.
    pub fn compile(self) -> Result<Settings, Problems> {
        if self.path.as_os_str().is_empty() {
            Err(vec![("path".into(), "must not be empty".into())])
        } else {
            Ok(self)
        }
    }
}

impl SinkSpec for Settings {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}
