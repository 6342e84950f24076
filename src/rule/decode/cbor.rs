//! `decode: cbor`: one CBOR item (RFC 8949), read header by header with ciborium-ll
//! straight into the value jq sees (no intermediate tree), mapped as the parent module
//! says. What is particular to CBOR:
//!
//! - half, single and double floats are all numbers;
//! - tags are dropped, the tagged item kept (tag 0 gives its date/time string, tag 1
//!   its epoch seconds as a number), except the bignums: tag 2 (unsigned) and 3
//!   (negative) around a byte string are a number when they fit in an i64 or a u64,
//!   else their decimal text; a bignum of more than [`MAX_BIGNUM`] bytes is an error;
//! - `undefined` is null; simple values other than false, true, null and undefined
//!   are their number;
//! - definite and indefinite lengths are both read; text must be UTF-8.

use ciborium_ll::{Decoder, Header, simple, tag};
use jaq_json::Val;
use num_bigint::{BigInt, BigUint};

use super::{float, int, nested, object, room};

/// The most significant bytes a bignum may have: 128 (308 decimal digits). Turning a
/// longer one into decimal text takes time quadratic in its length.
const MAX_BIGNUM: usize = 128;

/// Reads `payload` as exactly one CBOR item.
pub(super) fn decode(payload: &[u8]) -> Result<Val, String> {
    let mut dec = Decoder::from(payload);
    let val = item(&mut dec, 0)?;
    match payload.len() - dec.offset() {
        0 => Ok(val),
        n => Err(format!(
            "{n} bytes after the item (which ends at byte {})",
            dec.offset()
        )),
    }
}

/// Why the decoder stopped: the payload ended inside an item, or a header is malformed.
fn malformed<E>(e: ciborium_ll::Error<E>) -> String {
    match e {
        ciborium_ll::Error::Io(_) => "truncated: the payload ends inside an item".into(),
        ciborium_ll::Error::Syntax(at) => format!("malformed item at byte {at}"),
    }
}

/// One item (its tags included), arrays and maps `depth` levels down.
fn item(dec: &mut Decoder<&[u8]>, depth: usize) -> Result<Val, String> {
    let at = dec.offset();
    // Tags only annotate the item they wrap; the innermost one is the one that counts.
    let mut tagged = None;
    loop {
        let val = match (dec.pull().map_err(malformed)?, tagged) {
            (Header::Tag(t), _) => {
                tagged = Some(t);
                continue;
            }
            (Header::Bytes(len), Some(t @ (tag::BIGPOS | tag::BIGNEG))) => {
                bignum(t == tag::BIGNEG, &bytes(dec, len)?, at)?
            }
            (_, Some(t @ (tag::BIGPOS | tag::BIGNEG))) => {
                return Err(format!(
                    "bignum (tag {t}) at byte {at} is not a byte string"
                ));
            }
            (Header::Positive(n), _) => int(i128::from(n)),
            (Header::Negative(n), _) => int(-1 - i128::from(n)),
            (Header::Float(f), _) => float(f),
            (Header::Simple(simple::FALSE), _) => Val::Bool(false),
            (Header::Simple(simple::TRUE), _) => Val::Bool(true),
            (Header::Simple(simple::NULL | simple::UNDEFINED), _) => Val::Null,
            (Header::Simple(n), _) => Val::from(isize::from(n)),
            (Header::Bytes(len), _) => Val::byte_str(bytes(dec, len)?),
            (Header::Text(len), _) => Val::from(text(dec, len)?),
            (Header::Array(len), _) => {
                let depth = nested(depth, at)?;
                let mut items = Vec::with_capacity(room(len.unwrap_or(0)));
                while more(dec, items.len(), len)? {
                    items.push(item(dec, depth)?);
                }
                items.into_iter().collect()
            }
            (Header::Map(len), _) => {
                let depth = nested(depth, at)?;
                let mut entries = Vec::with_capacity(room(len.unwrap_or(0)));
                while more(dec, entries.len(), len)? {
                    entries.push((item(dec, depth)?, item(dec, depth)?));
                }
                object(entries)
            }
            (Header::Break, _) => return Err(format!("unexpected break (0xff) at byte {at}")),
        };
        return Ok(val);
    }
}

/// Whether an array or map of `len` elements (None: until a break) that has `read`
/// of them has another one.
fn more(dec: &mut Decoder<&[u8]>, read: usize, len: Option<usize>) -> Result<bool, String> {
    if let Some(len) = len {
        return Ok(read < len);
    }
    match dec.pull().map_err(malformed)? {
        Header::Break => Ok(false),
        h => {
            dec.push(h);
            Ok(true)
        }
    }
}

/// A byte string's content, its chunks joined when its length is indefinite.
fn bytes(dec: &mut Decoder<&[u8]>, len: Option<usize>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    let mut segments = dec.bytes(len);
    while let Some(mut segment) = segments.pull().map_err(malformed)? {
        while let Some(chunk) = segment.pull(&mut buf).map_err(malformed)? {
            out.extend_from_slice(chunk);
        }
    }
    Ok(out)
}

/// A text string's content (UTF-8, else malformed), its chunks joined.
fn text(dec: &mut Decoder<&[u8]>, len: Option<usize>) -> Result<String, String> {
    let mut out = String::new();
    let mut buf = [0; 4096];
    let mut segments = dec.text(len);
    while let Some(mut segment) = segments.pull().map_err(malformed)? {
        while let Some(chunk) = segment.pull(&mut buf).map_err(malformed)? {
            out.push_str(chunk);
        }
    }
    Ok(out)
}

/// A bignum: `magnitude` big-endian, the value `-1 - magnitude` when `negative`.
fn bignum(negative: bool, magnitude: &[u8], at: usize) -> Result<Val, String> {
    let significant = magnitude.iter().skip_while(|&&b| b == 0).count();
    if significant > MAX_BIGNUM {
        return Err(format!(
            "bignum at byte {at} has {significant} bytes (at most {MAX_BIGNUM})"
        ));
    }
    let n = BigInt::from(BigUint::from_bytes_be(magnitude));
    let n = if negative { -1 - n } else { n };
    Ok(match i128::try_from(&n) {
        Ok(i) => int(i),
        Err(_) => Val::from(n.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium_ll::Encoder;
    use serde_json::{Value, json};

    /// A payload written with ciborium-ll's encoder.
    fn cbor(write: impl FnOnce(&mut Encoder<&mut Vec<u8>>) -> std::io::Result<()>) -> Vec<u8> {
        let mut buf = Vec::new();
        write(&mut Encoder::from(&mut buf)).unwrap();
        buf
    }

    fn read(payload: &[u8]) -> Value {
        crate::rule::jq::to_json(&decode(payload).unwrap())
    }

    fn error(payload: &[u8]) -> String {
        decode(payload).unwrap_err()
    }

    #[test]
    fn scalars_arrays_and_maps_read_as_json() {
        let payload = cbor(|e| {
            e.push(Header::Map(Some(12)))?;
            e.text("t", None)?;
            e.push(Header::Float(21.5))?;
            e.text("n", None)?;
            e.push(Header::Negative(2))?;
            e.text("max", None)?;
            e.push(Header::Positive(u64::MAX))?;
            e.text("min", None)?;
            e.push(Header::Negative(u64::MAX))?;
            e.text("ok", None)?;
            e.push(Header::Simple(simple::TRUE))?;
            e.text("nil", None)?;
            e.push(Header::Simple(simple::NULL))?;
            e.text("undef", None)?;
            e.push(Header::Simple(simple::UNDEFINED))?;
            e.text("simple", None)?;
            e.push(Header::Simple(16))?;
            e.text("b", None)?;
            e.bytes(&[0, 159, 146], None)?;
            e.text("nan", None)?;
            e.push(Header::Float(f64::NAN))?;
            e.text("inf", None)?;
            e.push(Header::Float(f64::INFINITY))?;
            e.text("list", None)?;
            e.push(Header::Array(None))?;
            e.push(Header::Positive(1))?;
            e.text("x", None)?;
            e.push(Header::Break)
        });
        assert_eq!(
            read(&payload),
            json!({
                "t": 21.5, "n": -3, "max": u64::MAX, "min": "-18446744073709551616",
                "ok": true, "nil": null, "undef": null, "simple": 16, "b": "AJ+S",
                "nan": null, "inf": null, "list": [1, "x"]
            })
        );
    }

    #[test]
    fn half_single_and_double_floats_are_numbers() {
        // 1.5 as a half (0xf9), a single (0xfa) and a double (0xfb).
        assert_eq!(read(&[0xf9, 0x3e, 0x00]), json!(1.5));
        assert_eq!(read(&[0xfa, 0x3f, 0xc0, 0, 0]), json!(1.5));
        assert_eq!(read(&[0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]), json!(1.5));
        // Half-precision NaN and infinity.
        assert_eq!(read(&[0xf9, 0x7e, 0x00]), json!(null));
        assert_eq!(read(&[0xf9, 0x7c, 0x00]), json!(null));
    }

    #[test]
    fn indefinite_strings_are_joined() {
        let payload = cbor(|e| {
            e.push(Header::Array(Some(2)))?;
            e.text("hello", Some(2))?;
            e.bytes(&[1, 2, 3], Some(1))
        });
        assert_eq!(read(&payload), json!(["hello", "AQID"]));
    }

    #[test]
    fn tags_are_dropped_except_bignums() {
        let payload = cbor(|e| {
            e.push(Header::Array(Some(5)))?;
            e.push(Header::Tag(0))?;
            e.text("2026-12-02T16:45:28Z", None)?;
            e.push(Header::Tag(1))?;
            e.push(Header::Positive(1_764_693_928))?;
            e.push(Header::Tag(1))?;
            e.push(Header::Float(1_764_693_928.5))?;
            e.push(Header::Tag(32))?;
            e.text("https://example.com", None)?;
            // The self-described CBOR tag around a tagged map.
            e.push(Header::Tag(55799))?;
            e.push(Header::Tag(1000))?;
            e.push(Header::Map(Some(1)))?;
            e.text("k", None)?;
            e.push(Header::Positive(1))
        });
        assert_eq!(
            read(&payload),
            json!([
                "2026-12-02T16:45:28Z",
                1_764_693_928,
                1_764_693_928.5,
                "https://example.com",
                {"k": 1}
            ])
        );
    }

    #[test]
    fn bignums_are_numbers_when_they_fit_else_decimal_text() {
        let bignum = |t: u64, magnitude: &[u8]| {
            read(&cbor(|e| {
                e.push(Header::Tag(t))?;
                e.bytes(magnitude, None)
            }))
        };
        assert_eq!(bignum(tag::BIGPOS, &[1, 0]), json!(256));
        assert_eq!(bignum(tag::BIGPOS, &[0, 0, 1]), json!(1));
        assert_eq!(bignum(tag::BIGPOS, &[0xff; 8]), json!(u64::MAX));
        assert_eq!(
            bignum(tag::BIGPOS, &[1, 0, 0, 0, 0, 0, 0, 0, 0]),
            json!("18446744073709551616")
        );
        assert_eq!(bignum(tag::BIGNEG, &[1, 0]), json!(-257));
        assert_eq!(
            bignum(
                tag::BIGNEG,
                &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
            ),
            json!(i64::MIN)
        );
        assert_eq!(
            bignum(tag::BIGNEG, &[0x80, 0, 0, 0, 0, 0, 0, 0]),
            json!("-9223372036854775809")
        );
        let mut widest = vec![0; 10];
        widest.extend([0xff; MAX_BIGNUM]);
        assert!(bignum(tag::BIGPOS, &widest).as_str().unwrap().len() > 300);
    }

    #[test]
    fn bad_bignums_are_errors() {
        let too_big = cbor(|e| {
            e.push(Header::Tag(tag::BIGPOS))?;
            e.bytes(&[1; MAX_BIGNUM + 1], None)
        });
        assert!(error(&too_big).contains("has 129 bytes (at most 128)"));
        let not_bytes = cbor(|e| {
            e.push(Header::Tag(tag::BIGNEG))?;
            e.text("12", None)
        });
        assert_eq!(
            error(&not_bytes),
            "bignum (tag 3) at byte 0 is not a byte string"
        );
    }

    #[test]
    fn keys_that_are_not_text_become_text() {
        let payload = cbor(|e| {
            e.push(Header::Map(Some(5)))?;
            e.push(Header::Positive(1))?;
            e.text("a", None)?;
            e.push(Header::Negative(0))?;
            e.text("b", None)?;
            e.bytes(&[0, 159, 146], None)?;
            e.text("c", None)?;
            e.push(Header::Array(Some(1)))?;
            e.push(Header::Simple(simple::FALSE))?;
            e.text("d", None)?;
            // The same key as the first, as text: the last one wins.
            e.text("1", None)?;
            e.text("e", None)
        });
        assert_eq!(
            read(&payload),
            json!({"1": "e", "-1": "b", "AJ+S": "c", "[false]": "d"})
        );
    }

    #[test]
    fn not_exactly_one_well_formed_item_is_an_error() {
        let truncated = "truncated: the payload ends inside an item";
        assert_eq!(error(&[]), truncated);
        // A map of two entries with one.
        assert_eq!(error(&[0xa2, 0x61, b'a', 0x01]), truncated);
        // An array, then a byte string, claiming 2^64 - 1 elements.
        assert_eq!(
            error(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            truncated
        );
        assert_eq!(
            error(&[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            truncated
        );
        assert_eq!(
            error(&[0x01, 0x02, 0x03]),
            "2 bytes after the item (which ends at byte 1)"
        );
        // Additional information 28 is reserved.
        assert_eq!(error(&[0x1c]), "malformed item at byte 0");
        // Text that is not UTF-8.
        assert_eq!(
            error(&[0x82, 0x00, 0x62, 0xff, 0xfe]),
            "malformed item at byte 2"
        );
        assert_eq!(error(&[0xff]), "unexpected break (0xff) at byte 0");
        assert_eq!(
            error(&[0x82, 0x00, 0xff]),
            "unexpected break (0xff) at byte 2"
        );
    }
}
