//! The sidecar of a dead-letter file: which of its letters were replayed.
//!
//! The dead-letter file itself is never rewritten: a running mqbridge appends to it, and
//! replacing it would lose the letters appended meanwhile. Instead `FILE.replayed` gets
//! one line per letter that replay delivered:
//!
//! ```text
//! <hex SHA-256 of the letter's line> <replayed at, RFC 3339> <message id>
//! ```
//!
//! Only the first field counts; the others are for people. Each line is appended and
//! fsynced before the letter counts as replayed, so a crash between the delivery and the
//! mark can resend that one letter (at least once, as everywhere in mqbridge), never
//! lose the mark of an earlier one. A last line cut short by a crash is no id of any
//! letter, so it is harmless.

use std::collections::HashSet;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// The sidecar's path for `dead_letters`: the same name with `.replayed` appended.
pub fn path_for(dead_letters: &Path) -> PathBuf {
    let mut name = dead_letters.as_os_str().to_owned();
    name.push(".replayed");
    PathBuf::from(name)
}

/// The ids read from a sidecar, and the way to add to it.
#[derive(Debug)]
pub struct Sidecar {
    path: PathBuf,
    ids: HashSet<String>,
}

impl Sidecar {
    /// Reads the sidecar at `path` (none yet: nothing replayed).
    pub fn open(path: PathBuf) -> io::Result<Sidecar> {
        let ids = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e),
        };
        Ok(Sidecar { path, ids })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the letter with this id was replayed.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Records the letter `id` (of the message `message_id`) as replayed: appended and
    /// fsynced before this returns.
    pub fn mark(&mut self, id: &str, message_id: &str) -> io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let now = crate::rule::rfc3339(jiff::Timestamp::now());
        file.write_all(format!("{id} {now} {message_id}\n").as_bytes())?;
        file.sync_data()?;
        self.ids.insert(id.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_reopen_and_the_letters_file_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let letters = dir.path().join("dead.jsonl");
        std::fs::write(&letters, "{}\n").unwrap();
        let path = path_for(&letters);
        assert_eq!(path, dir.path().join("dead.jsonl.replayed"));

        let mut s = Sidecar::open(path.clone()).unwrap();
        assert!(!s.contains("aa"));
        s.mark("aa", "m1").unwrap();
        s.mark("bb", "m2").unwrap();
        assert!(s.contains("aa"));

        let again = Sidecar::open(path.clone()).unwrap();
        assert!(again.contains("aa") && again.contains("bb") && !again.contains("m1"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.starts_with("aa ") && text.contains(" m2\n"), "{text}");
        assert_eq!(std::fs::read_to_string(&letters).unwrap(), "{}\n");
    }

    #[test]
    fn a_torn_last_line_marks_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.replayed");
        std::fs::write(&path, "aa 2026-01-01T00:00:00Z m\nbb").unwrap();
        let s = Sidecar::open(path).unwrap();
        assert!(s.contains("aa"));
        // A cut id is a prefix of a real one, never equal to it.
        assert!(!s.contains("bbcc"));
    }
}
