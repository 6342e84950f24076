//! Human-friendly units in the rules file: durations (`50ms`, `2s`, `5m`, `1h`) and byte
//! sizes (`64KiB`, `1MiB`, `1GiB`, or a plain number of bytes).

use std::borrow::Cow;
use std::fmt;
use std::time::Duration as StdDuration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as `<number><unit>`, unit one of `ms`, `s`, `m`, `h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub StdDuration);

/// A size in bytes, written `1024`, `64KiB`, `1MiB`, `1GiB` (also `KB`, `MB`, `GB` = powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// The largest remaining length MQTT can encode (four bytes of seven bits), and so the
/// bound of any maximum packet size. Defined here, with the check of the configured
/// sizes, so that the config imports no component; the broker's codec uses it too.
pub const MQTT_MAX_REMAINING: usize = 268_435_455;

impl ByteSize {
    /// As an MQTT maximum packet size (the embedded broker's, or the client's): from 64
    /// bytes to the largest packet MQTT can encode.
    pub fn check_packet_size(self) -> Result<(), String> {
        let max = MQTT_MAX_REMAINING as u64;
        if (64..=max).contains(&self.0) {
            Ok(())
        } else {
            Err("must be between 64 bytes and 256MiB".into())
        }
    }
}

fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (num, unit) = split_number(s.trim());
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 50ms, 2s, 5m, 1h"))?;
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unit must be ms, s, m or h"
                ));
            }
        };
        Ok(Duration(StdDuration::from_secs_f64(n * scale)))
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (num, unit) = split_number(s.trim());
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected e.g. 512KiB, 1MiB, 1GiB"))?;
        let scale: u64 = match unit {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unit must be B, KiB, MiB or GiB"
                ));
            }
        };
        Ok(ByteSize((n * scale as f64) as u64))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= scale && n.is_multiple_of(scale) {
                return write!(f, "{}{unit}", n / scale);
            }
        }
        write!(f, "{n}")
    }
}

macro_rules! string_unit {
    ($t:ty, $name:literal, $pattern:literal, $desc:literal) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    N(u64),
                    S(String),
                }
                match Raw::deserialize(d)? {
                    Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
                    Raw::N(n) => format!("{n}").parse().map_err(serde::de::Error::custom),
                }
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl schemars::JsonSchema for $t {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": $pattern,
                    "description": $desc,
                })
            }
        }
    };
}

string_unit!(
    Duration,
    "Duration",
    "^[0-9]+(\\.[0-9]+)?(ms|s|m|h)$",
    "A duration such as 50ms, 2s, 5m or 1h."
);
string_unit!(
    ByteSize,
    "ByteSize",
    "^[0-9]+(\\.[0-9]+)?(B|KiB|MiB|GiB|KB|MB|GB)?$",
    "A size such as 65536, 64KiB, 1MiB or 1GiB."
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            "50ms".parse::<Duration>().unwrap().0,
            StdDuration::from_millis(50)
        );
        assert_eq!(
            "2s".parse::<Duration>().unwrap().0,
            StdDuration::from_secs(2)
        );
        assert_eq!(
            "1.5s".parse::<Duration>().unwrap().0,
            StdDuration::from_millis(1500)
        );
        assert_eq!(
            "5m".parse::<Duration>().unwrap().0,
            StdDuration::from_secs(300)
        );
        assert!("5".parse::<Duration>().is_err());
        assert!("5d".parse::<Duration>().is_err());
        assert!("ms".parse::<Duration>().is_err());
        assert_eq!(Duration(StdDuration::from_millis(50)).to_string(), "50ms");
    }

    #[test]
    fn sizes() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("1GiB".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("1000".parse::<ByteSize>().unwrap().0, 1000);
        assert!("1TB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(1 << 20).to_string(), "1MiB");
    }

    #[test]
    fn packet_sizes_run_from_64_bytes_to_what_mqtt_can_encode() {
        assert!(ByteSize(63).check_packet_size().is_err());
        assert!(ByteSize(64).check_packet_size().is_ok());
        assert!(ByteSize(268_435_455).check_packet_size().is_ok());
        assert!(ByteSize(268_435_456).check_packet_size().is_err());
    }
}
