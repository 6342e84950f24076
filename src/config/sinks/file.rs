//! Settings of the `file` sink ([`crate::sink::file`]).

use std::path::PathBuf;

use super::SinkSpec;

super::sink_config! {
    /// `type: file`.
    pub struct Config {
        /// File to append to; created (with its folder) when missing.
        pub path: PathBuf,
    }
}

impl SinkSpec for Config {
    fn validate(&self) -> Vec<(&'static str, String)> {
        if self.path.as_os_str().is_empty() {
            vec![("path", "must not be empty".into())]
        } else {
            vec![]
        }
    }
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}
