//! What starts a config reload: SIGHUP (at once), or a change of the config file, seen by
//! polling its contents every [`POLL`] and applied once they have stayed the same for
//! one more poll (an editor or `cp` may write the file in several steps).
//!
//! Polling, not inotify: it needs no dependency, and it also sees a file replaced by a
//! rename (editors, ConfigMap updates through a symlink), which a watch on the old inode
//! would miss. A missing or unreadable file is taken as "not changed yet".
//!
//! Triggers coalesce: while one reload waits to run, further ones add nothing (the
//! reload reads the file as it is then).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often the config file is read to see whether it changed.
pub const POLL: Duration = Duration::from_secs(1);

/// Why a reload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Signal,
    FileChanged,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::Signal => "SIGHUP",
            Cause::FileChanged => "the file changed",
        })
    }
}

/// The reload triggers of one config file.
pub struct Triggers {
    rx: Option<mpsc::Receiver<Cause>>,
}

impl Triggers {
    /// No reloads (no config file to read again).
    pub fn none() -> Triggers {
        Triggers { rx: None }
    }

    /// Listens for SIGHUP and polls `path` until `stop`. Call it early: once it returns,
    /// SIGHUP no longer ends the process.
    pub fn start(path: PathBuf, stop: CancellationToken) -> Triggers {
        let (tx, rx) = mpsc::channel(1);
        let mut hup = hangups();
        tokio::spawn(async move {
            let mut debounce = Debounce::new(stamp(&path).await);
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    Some(()) = next_hangup(&mut hup) => {
                        // The reload reads the file as it is now: no second reload for
                        // the change that was signalled.
                        debounce.applied(stamp(&path).await);
                        let _ = tx.try_send(Cause::Signal);
                    }
                    _ = tick.tick() => {
                        if debounce.observe(stamp(&path).await) {
                            let _ = tx.try_send(Cause::FileChanged);
                        }
                    }
                }
            }
        });
        Triggers { rx: Some(rx) }
    }

    /// The next trigger; never resolves without a file.
    pub async fn next(&mut self) -> Option<Cause> {
        match &mut self.rx {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

/// SIGHUP, from now on (None: not available here).
fn hangups() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::hangup())
            .map_err(|e| tracing::warn!("cannot listen for SIGHUP, reload on it is off: {e}"))
            .ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The next SIGHUP; never resolves without them.
async fn next_hangup(hup: &mut Hangups) -> Option<()> {
    #[cfg(unix)]
    if let Some(hup) = hup {
        return hup.recv().await;
    }
    let _ = hup;
    std::future::pending().await
}

/// A hash of the file's contents; None when it cannot be read.
async fn stamp(path: &Path) -> Option<u64> {
    let bytes = tokio::fs::read(path).await.ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Tells when the file changed and has settled: its stamp differs from the one last
/// applied and is the same as at the previous poll.
#[derive(Debug)]
struct Debounce {
    applied: Option<u64>,
    seen: Option<u64>,
}

impl Debounce {
    fn new(at_start: Option<u64>) -> Debounce {
        Debounce {
            applied: at_start,
            seen: at_start,
        }
    }

    /// A reload (on a signal) read the file as `now`.
    fn applied(&mut self, now: Option<u64>) {
        if now.is_some() {
            self.applied = now;
            self.seen = now;
        }
    }

    /// Takes one poll's stamp; true: reload now.
    fn observe(&mut self, now: Option<u64>) -> bool {
        let Some(now) = now else {
            self.seen = None;
            return false;
        };
        let settled = self.seen == Some(now);
        self.seen = Some(now);
        if settled && self.applied != Some(now) {
            self.applied = Some(now);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_reloads_once_it_has_settled_and_only_once() {
        let mut d = Debounce::new(Some(1));
        assert!(!d.observe(Some(1)), "unchanged");
        assert!(!d.observe(Some(2)), "changed, not settled yet");
        assert!(!d.observe(Some(3)), "still being written");
        assert!(d.observe(Some(3)), "settled");
        assert!(!d.observe(Some(3)), "already applied");
        assert!(!d.observe(Some(1)), "changed back, not settled");
        assert!(d.observe(Some(1)), "changed back and settled");
    }

    #[test]
    fn a_missing_file_is_not_a_change() {
        let mut d = Debounce::new(Some(1));
        assert!(!d.observe(None), "replaced: gone for a moment");
        assert!(!d.observe(Some(1)), "back, the same");
        assert!(!d.observe(Some(1)));
        assert!(!d.observe(None));
        assert!(!d.observe(Some(2)));
        assert!(d.observe(Some(2)));
    }
}
