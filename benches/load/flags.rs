//! Command-line flags of the load tool's modes: `--name value` pairs, read in order.

use std::fmt::Display;
use std::str::FromStr;

/// The arguments of one mode, `--bench` (which `cargo bench` adds) left out.
pub struct Flags(std::vec::IntoIter<String>);

impl Flags {
    pub fn new(args: Vec<String>) -> Flags {
        Flags(args.into_iter())
    }

    /// The next flag's name; None at the end.
    pub fn next_flag(&mut self) -> Option<String> {
        self.0.next()
    }

    /// The value that follows `flag`, parsed.
    pub fn value<T: FromStr>(&mut self, flag: &str) -> T
    where
        T::Err: Display,
    {
        let raw = self
            .0
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        raw.parse().unwrap_or_else(|e| panic!("{flag} {raw}: {e}"))
    }

    /// A comma-separated list after `flag` (`--qos 0,1`).
    pub fn list<T: FromStr>(&mut self, flag: &str) -> Vec<T>
    where
        T::Err: Display,
    {
        let raw: String = self.value(flag);
        raw.split(',')
            .map(|v| v.parse().unwrap_or_else(|e| panic!("{flag} {v}: {e}")))
            .collect()
    }
}
