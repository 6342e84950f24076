//! The process's own gauges, read from `/proc/self` (Linux): resident memory and open
//! file descriptors. Refreshed with the exporter's upkeep; elsewhere (no `/proc`) they
//! are simply not set.

use std::fs;

/// Sets `mqbridge_process_resident_memory_bytes` and `mqbridge_process_open_fds`.
pub fn record() {
    if let Some(rss) = resident_bytes() {
        metrics::gauge!("mqbridge_process_resident_memory_bytes").set(rss as f64);
    }
    if let Ok(fds) = fs::read_dir("/proc/self/fd") {
        metrics::gauge!("mqbridge_process_open_fds").set(fds.count() as f64);
    }
}

/// Resident set size: `VmRSS` in `/proc/self/status`, given in kB.
fn resident_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn resident_memory_is_read_and_plausible() {
        let rss = super::resident_bytes().expect("/proc/self/statm on Linux");
        // A test binary holds at least a megabyte and (here) less than a few gigabytes.
        assert!((1 << 20..8 << 30).contains(&rss), "{rss} bytes");
    }
}
