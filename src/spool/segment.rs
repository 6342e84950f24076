//! Segment files: the spool's records, appended in order to files named after the first
//! record number they hold (`00000000000000001234.seg`).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::record::{self, Decoded, HEADER};

const SUFFIX: &str = ".seg";

/// The file of the segment whose first record is `first`.
pub fn path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{SUFFIX}"))
}

/// The segments in `dir`, by first record number, with their sizes.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((first, entry.metadata()?.len()));
    }
    found.sort_unstable();
    Ok(found)
}

/// What reading the next record of a segment gave.
// Returned by value once per record: a move is cheaper than boxing each record.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    Record(Decoded),
    /// The segment ends cleanly here.
    End,
    /// The bytes here are not a whole, intact record (a torn write, or corruption).
    Broken(String),
}

/// Reads a segment's records in order.
pub struct SegmentReader {
    file: BufReader<File>,
    /// Bytes of whole records read so far.
    pub offset: u64,
    names: record::Names,
}

impl SegmentReader {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(SegmentReader {
            file: BufReader::with_capacity(256 << 10, File::open(path)?),
            offset: 0,
            names: record::Names::default(),
        })
    }

    /// Continues at byte `offset`, where a record starts.
    pub fn seek(&mut self, offset: u64) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.offset = offset;
        Ok(())
    }

    pub fn next(&mut self) -> io::Result<Next> {
        let mut header = [0u8; HEADER];
        match read_full(&mut self.file, &mut header)? {
            0 => return Ok(Next::End),
            HEADER => {}
            n => {
                return Ok(Next::Broken(format!(
                    "{n}-byte fragment of a record header"
                )));
            }
        }
        let (len, crc) = match record::body_len(&header) {
            Ok(v) => v,
            Err(e) => return Ok(Next::Broken(e)),
        };
        // Read into a vector of the body's size, not zeroed first; as `Bytes` it is one
        // allocation (see `record::decode`).
        let mut body = Vec::with_capacity(len);
        let got = (&mut self.file).take(len as u64).read_to_end(&mut body)?;
        if got < len {
            return Ok(Next::Broken(format!(
                "record cut short ({got} of {len} bytes)"
            )));
        }
        match record::decode(Bytes::from(body), crc, &mut self.names) {
            Ok(d) => {
                self.offset += (HEADER + len) as u64;
                Ok(Next::Record(d))
            }
            Err(e) => Ok(Next::Broken(e)),
        }
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
