//! `decode: msgpack`: one MessagePack value, read marker by marker with rmp straight
//! into the value jq sees (no intermediate tree), mapped as the parent module says.
//! What is particular to MessagePack:
//!
//! - `str` must be UTF-8 and shares the payload's buffer, as `bin` (a byte string) does;
//! - the timestamp extension (type -1, in its 32-, 64- and 96-bit forms) is an RFC 3339
//!   UTC string, with fractional seconds only when they are not zero
//!   (`2026-12-02T16:45:28Z`, `2026-12-02T16:45:28.5Z`);
//! - any other extension is `{"ext": type, "data": bytes}`;
//! - the marker the specification never uses (0xc1) is an error.

use bytes::Bytes;
use jaq_json::Val;
use rmp::Marker;
use rmp::decode::{RmpRead, read_marker};

use super::{float, int, nested, object, room};

/// The extension type of timestamps.
const TIMESTAMP: i8 = -1;

/// Reads `payload` as exactly one MessagePack value.
pub(super) fn decode(payload: &Bytes) -> Result<Val, String> {
    let mut reader = Reader {
        payload,
        rest: payload,
    };
    let val = reader.value(0)?;
    match reader.rest.len() {
        0 => Ok(val),
        n => Err(format!(
            "{n} bytes after the value (which ends at byte {})",
            reader.at()
        )),
    }
}

/// The error of reading past the end; the only way rmp fails on a slice.
fn truncated<E>(_: E) -> String {
    "truncated: the payload ends inside a value".into()
}

/// Where reading is: the payload, and what is left of it.
struct Reader<'p> {
    payload: &'p Bytes,
    rest: &'p [u8],
}

impl Reader<'_> {
    /// The offset of the next byte to read.
    fn at(&self) -> usize {
        self.payload.len() - self.rest.len()
    }

    /// One value, arrays and maps `depth` levels down.
    fn value(&mut self, depth: usize) -> Result<Val, String> {
        let at = self.at();
        let rest = &mut self.rest;
        Ok(match read_marker(rest).map_err(truncated)? {
            Marker::Null => Val::Null,
            Marker::True => Val::Bool(true),
            Marker::False => Val::Bool(false),
            Marker::FixPos(n) => Val::from(isize::from(n)),
            Marker::FixNeg(n) => Val::from(isize::from(n)),
            Marker::U8 => int(i128::from(rest.read_data_u8().map_err(truncated)?)),
            Marker::U16 => int(i128::from(rest.read_data_u16().map_err(truncated)?)),
            Marker::U32 => int(i128::from(rest.read_data_u32().map_err(truncated)?)),
            Marker::U64 => int(i128::from(rest.read_data_u64().map_err(truncated)?)),
            Marker::I8 => int(i128::from(rest.read_data_i8().map_err(truncated)?)),
            Marker::I16 => int(i128::from(rest.read_data_i16().map_err(truncated)?)),
            Marker::I32 => int(i128::from(rest.read_data_i32().map_err(truncated)?)),
            Marker::I64 => int(i128::from(rest.read_data_i64().map_err(truncated)?)),
            Marker::F32 => float(f64::from(rest.read_data_f32().map_err(truncated)?)),
            Marker::F64 => float(rest.read_data_f64().map_err(truncated)?),
            Marker::FixStr(n) => self.text(usize::from(n), at)?,
            m @ (Marker::Str8 | Marker::Str16 | Marker::Str32) => {
                let len = self.len(m)?;
                self.text(len, at)?
            }
            m @ (Marker::Bin8 | Marker::Bin16 | Marker::Bin32) => {
                let len = self.len(m)?;
                Val::byte_str(self.take(len)?)
            }
            Marker::FixArray(n) => self.array(usize::from(n), depth, at)?,
            m @ (Marker::Array16 | Marker::Array32) => {
                let len = self.len(m)?;
                self.array(len, depth, at)?
            }
            Marker::FixMap(n) => self.map(usize::from(n), depth, at)?,
            m @ (Marker::Map16 | Marker::Map32) => {
                let len = self.len(m)?;
                self.map(len, depth, at)?
            }
            Marker::FixExt1 => self.ext(1, at)?,
            Marker::FixExt2 => self.ext(2, at)?,
            Marker::FixExt4 => self.ext(4, at)?,
            Marker::FixExt8 => self.ext(8, at)?,
            Marker::FixExt16 => self.ext(16, at)?,
            m @ (Marker::Ext8 | Marker::Ext16 | Marker::Ext32) => {
                let len = self.len(m)?;
                self.ext(len, at)?
            }
            Marker::Reserved => return Err(format!("reserved marker 0xc1 at byte {at}")),
        })
    }

    /// The length that follows a marker of variable length: 8, 16 or 32 bits.
    fn len(&mut self, marker: Marker) -> Result<usize, String> {
        let rest = &mut self.rest;
        Ok(match marker {
            Marker::Str8 | Marker::Bin8 | Marker::Ext8 => {
                usize::from(rest.read_data_u8().map_err(truncated)?)
            }
            Marker::Str16 | Marker::Bin16 | Marker::Ext16 | Marker::Array16 | Marker::Map16 => {
                usize::from(rest.read_data_u16().map_err(truncated)?)
            }
            // The 32-bit ones; a length beyond the address space cannot be in the payload.
            _ => usize::try_from(rest.read_data_u32().map_err(truncated)?).map_err(truncated)?,
        })
    }

    /// The next `len` bytes, sharing the payload's buffer.
    fn take(&mut self, len: usize) -> Result<Bytes, String> {
        let Some(rest) = self.rest.get(len..) else {
            return Err(truncated(()));
        };
        let at = self.at();
        self.rest = rest;
        Ok(self.payload.slice(at..at + len))
    }

    /// A `str` of `len` bytes, which must be UTF-8.
    fn text(&mut self, len: usize, at: usize) -> Result<Val, String> {
        let s = self.take(len)?;
        match std::str::from_utf8(&s) {
            Ok(_) => Ok(Val::utf8_str(s)),
            Err(e) => Err(format!("the string at byte {at} is not UTF-8: {e}")),
        }
    }

    fn array(&mut self, len: usize, depth: usize, at: usize) -> Result<Val, String> {
        let depth = nested(depth, at)?;
        let mut items = Vec::with_capacity(room(len));
        for _ in 0..len {
            items.push(self.value(depth)?);
        }
        Ok(items.into_iter().collect())
    }

    fn map(&mut self, len: usize, depth: usize, at: usize) -> Result<Val, String> {
        let depth = nested(depth, at)?;
        let mut entries = Vec::with_capacity(room(len));
        for _ in 0..len {
            entries.push((self.value(depth)?, self.value(depth)?));
        }
        Ok(object(entries))
    }

    /// An extension of `len` bytes of data (after its type).
    fn ext(&mut self, len: usize, at: usize) -> Result<Val, String> {
        let kind = self.rest.read_data_i8().map_err(truncated)?;
        let data = self.take(len)?;
        if kind == TIMESTAMP {
            return timestamp(&data, at);
        }
        Ok(object(vec![
            (Val::from("ext".to_string()), Val::from(isize::from(kind))),
            (Val::from("data".to_string()), Val::byte_str(data)),
        ]))
    }
}

/// The timestamp extension's data (32 bits of seconds; 30 of nanoseconds and 34 of
/// seconds; or 32 of nanoseconds and 64 of signed seconds) as RFC 3339 UTC text.
fn timestamp(data: &[u8], at: usize) -> Result<Val, String> {
    let (seconds, nanos) = match *data {
        [a, b, c, d] => (i64::from(u32::from_be_bytes([a, b, c, d])), 0),
        [a, b, c, d, e, f, g, h] => {
            let v = u64::from_be_bytes([a, b, c, d, e, f, g, h]);
            // 34 bits of seconds always fit in an i64.
            ((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32)
        }
        [a, b, c, d, e, f, g, h, i, j, k, l] => (
            i64::from_be_bytes([e, f, g, h, i, j, k, l]),
            u32::from_be_bytes([a, b, c, d]),
        ),
        _ => {
            return Err(format!(
                "the timestamp at byte {at} has {} bytes (4, 8 or 12)",
                data.len()
            ));
        }
    };
    let time = i32::try_from(nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| format!("the timestamp at byte {at} has {nanos} nanoseconds"))
        .and_then(|n| {
            jiff::Timestamp::new(seconds, n)
                .map_err(|e| format!("the timestamp at byte {at} is out of range: {e}"))
        })?;
    Ok(Val::from(time.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmp::encode;
    use serde_json::{Value, json};

    /// A payload written with rmp's encoder.
    fn msgpack(
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), Box<dyn std::error::Error>>,
    ) -> Bytes {
        let mut buf = Vec::new();
        write(&mut buf).unwrap();
        Bytes::from(buf)
    }

    fn read(payload: &Bytes) -> Value {
        crate::rule::jq::to_json(&decode(payload).unwrap())
    }

    fn error(payload: &[u8]) -> String {
        decode(&Bytes::copy_from_slice(payload)).unwrap_err()
    }

    /// An extension value of type `kind`.
    fn ext(buf: &mut Vec<u8>, kind: i8, data: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
        encode::write_ext_meta(buf, data.len() as u32, kind)?;
        buf.extend_from_slice(data);
        Ok(())
    }

    #[test]
    fn scalars_arrays_and_maps_read_as_json() {
        let payload = msgpack(|b| {
            encode::write_map_len(b, 11)?;
            encode::write_str(b, "t")?;
            encode::write_f32(b, 21.5)?;
            encode::write_str(b, "d")?;
            encode::write_f64(b, -0.25)?;
            encode::write_str(b, "n")?;
            encode::write_sint(b, -300)?;
            encode::write_str(b, "max")?;
            encode::write_u64(b, u64::MAX)?;
            encode::write_str(b, "min")?;
            encode::write_i64(b, i64::MIN)?;
            encode::write_str(b, "ok")?;
            encode::write_bool(b, false)?;
            encode::write_str(b, "nil")?;
            encode::write_nil(b)?;
            encode::write_str(b, "b")?;
            encode::write_bin(b, &[0, 159, 146])?;
            encode::write_str(b, "nan")?;
            encode::write_f64(b, f64::NAN)?;
            encode::write_str(b, "inf")?;
            encode::write_f32(b, f32::NEG_INFINITY)?;
            encode::write_str(b, "list")?;
            encode::write_array_len(b, 2)?;
            encode::write_uint(b, 70_000)?;
            encode::write_str(b, "x")?;
            Ok(())
        });
        assert_eq!(
            read(&payload),
            json!({
                "t": 21.5, "d": -0.25, "n": -300, "max": u64::MAX, "min": i64::MIN,
                "ok": false, "nil": null, "b": "AJ+S", "nan": null, "inf": null,
                "list": [70_000, "x"]
            })
        );
    }

    #[test]
    fn keys_that_are_not_text_become_text() {
        let payload = msgpack(|b| {
            encode::write_map_len(b, 4)?;
            encode::write_sint(b, -7)?;
            encode::write_str(b, "a")?;
            encode::write_bin(b, &[0, 159, 146])?;
            encode::write_str(b, "b")?;
            encode::write_nil(b)?;
            encode::write_str(b, "c")?;
            encode::write_str(b, "-7")?;
            encode::write_str(b, "d")?;
            Ok(())
        });
        assert_eq!(read(&payload), json!({"-7": "d", "AJ+S": "b", "null": "c"}));
    }

    #[test]
    fn timestamps_are_rfc3339_text() {
        let payload = msgpack(|b| {
            encode::write_array_len(b, 4)?;
            // 32 bits: seconds.
            ext(b, TIMESTAMP, &1_764_693_928u32.to_be_bytes())?;
            // 64 bits: 30 of nanoseconds, 34 of seconds.
            ext(
                b,
                TIMESTAMP,
                &((500_000_000u64 << 34) | 1_764_693_928).to_be_bytes(),
            )?;
            // 96 bits: 32 of nanoseconds, 64 of signed seconds.
            let mut before_1970 = 123_456_789u32.to_be_bytes().to_vec();
            before_1970.extend((-1i64).to_be_bytes());
            ext(b, TIMESTAMP, &before_1970)?;
            ext(b, TIMESTAMP, &[0; 8])?;
            Ok(())
        });
        assert_eq!(
            read(&payload),
            json!([
                "2025-12-02T16:45:28Z",
                "2025-12-02T16:45:28.5Z",
                "1969-12-31T23:59:59.123456789Z",
                "1970-01-01T00:00:00Z"
            ])
        );
    }

    #[test]
    fn other_extensions_are_type_and_data() {
        let payload = msgpack(|b| ext(b, 42, &[1, 2, 3]));
        assert_eq!(read(&payload), json!({"ext": 42, "data": "AQID"}));
        let payload = msgpack(|b| ext(b, -128, &[]));
        assert_eq!(read(&payload), json!({"ext": -128, "data": ""}));
    }

    #[test]
    fn bad_timestamps_are_errors() {
        let three = msgpack(|b| ext(b, TIMESTAMP, &[0, 0, 1]));
        assert_eq!(
            error(&three),
            "the timestamp at byte 0 has 3 bytes (4, 8 or 12)"
        );
        let mut nanos = 1_000_000_000u32.to_be_bytes().to_vec();
        nanos.extend(0i64.to_be_bytes());
        let nanos = msgpack(|b| ext(b, TIMESTAMP, &nanos));
        assert_eq!(
            error(&nanos),
            "the timestamp at byte 0 has 1000000000 nanoseconds"
        );
        let mut far = vec![0; 4];
        far.extend(i64::MAX.to_be_bytes());
        let far = msgpack(|b| ext(b, TIMESTAMP, &far));
        assert!(error(&far).starts_with("the timestamp at byte 0 is out of range"));
    }

    #[test]
    fn not_exactly_one_well_formed_value_is_an_error() {
        let truncated = "truncated: the payload ends inside a value";
        assert_eq!(error(&[]), truncated);
        // A map of two entries with one.
        assert_eq!(error(&[0x82, 0xa1, b'a', 0x01]), truncated);
        // An array, a bin and a str claiming 2^32 - 1 elements or bytes.
        assert_eq!(error(&[0xdd, 0xff, 0xff, 0xff, 0xff]), truncated);
        assert_eq!(error(&[0xc6, 0xff, 0xff, 0xff, 0xff]), truncated);
        assert_eq!(error(&[0xdb, 0xff, 0xff, 0xff, 0xff]), truncated);
        // A u32 cut short.
        assert_eq!(error(&[0xce, 0x00, 0x01]), truncated);
        assert_eq!(
            error(&[0x01, 0x02, 0x03]),
            "2 bytes after the value (which ends at byte 1)"
        );
        assert_eq!(error(&[0x91, 0xc1]), "reserved marker 0xc1 at byte 1");
        assert!(error(&[0xa2, 0xff, 0xfe]).starts_with("the string at byte 0 is not UTF-8"));
    }

    #[test]
    fn strings_and_bins_share_the_payload() {
        let payload = msgpack(|b| {
            encode::write_array_len(b, 2)?;
            encode::write_str(b, "hello")?;
            encode::write_bin(b, b"raw")?;
            Ok(())
        });
        let Val::Arr(items) = decode(&payload).unwrap() else {
            panic!("an array")
        };
        for item in items.iter() {
            let (Val::TStr(b) | Val::BStr(b)) = item else {
                panic!("a string")
            };
            assert!(payload.as_ptr_range().contains(&b.as_ptr()));
        }
    }
}
