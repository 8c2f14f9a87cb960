//! Unit newtypes used by the validated configuration.
//!
//! The wire format stays plain (integers, floats, strings such as `"512MiB"`); validation turns
//! those into these types so a number of steps can never be passed where a number of tokens is
//! expected.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Steps(pub u64);

/// A number of tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tokens(pub u64);

/// A sequence length in tokens (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeqLen(pub u32);

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bytes(pub u64);

/// A ratio in `0.0..=1.0`; never NaN.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct Ratio(f64);

impl Ratio {
    /// A ratio, or `None` when `v` is NaN or outside `0.0..=1.0`.
    pub fn new(v: f64) -> Option<Self> {
        (0.0..=1.0).contains(&v).then_some(Ratio(v))
    }

    /// `v` clamped into `0.0..=1.0` (NaN becomes 0).
    pub fn saturating(v: f64) -> Self {
        if v.is_nan() {
            Ratio(0.0)
        } else {
            Ratio(v.clamp(0.0, 1.0))
        }
    }

    /// The value in `0.0..=1.0`.
    pub fn get(self) -> f64 {
        self.0
    }
}

macro_rules! display_with_unit {
    ($t:ty, $unit:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{} {}", self.0, $unit)
            }
        }
    };
}
display_with_unit!(Steps, "steps");
display_with_unit!(Tokens, "tokens");
display_with_unit!(SeqLen, "tokens/sequence");

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut unit = 0;
        let mut v = self.0;
        while unit + 1 < UNITS.len() && v >= 1024 && v.is_multiple_of(1024) {
            v /= 1024;
            unit += 1;
        }
        if unit == 0 && self.0 >= 1024 {
            // Not an exact multiple: show one decimal of the largest fitting unit.
            let mut x = self.0 as f64;
            let mut u = 0;
            while u + 1 < UNITS.len() && x >= 1024.0 {
                x /= 1024.0;
                u += 1;
            }
            return write!(f, "{x:.1}{}", UNITS[u]);
        }
        write!(f, "{v}{}", UNITS[unit])
    }
}

/// Why a byte size did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteSizeError {
    /// Empty string or no digits.
    NoNumber,
    /// The unit is not one of the allowed ones.
    UnknownUnit,
    /// The value does not fit in 64 bits.
    TooLarge,
    /// A negative or non-finite number.
    Invalid,
}

impl Bytes {
    /// The units [`Bytes::parse`] accepts.
    pub const UNITS: &'static str = "a whole number of bytes or a number with a unit: B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024), e.g. \"512MiB\"";

    /// Parses `"512MiB"`, `"1.5 GB"`, `"4096"`, `"64k"` (case-insensitive units).
    pub fn parse(s: &str) -> Result<Bytes, ByteSizeError> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: String = num.chars().filter(|c| *c != '_').collect();
        if num.is_empty() {
            return Err(ByteSizeError::NoNumber);
        }
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "m" | "mb" => 1000_u64.pow(2),
            "g" | "gb" => 1000_u64.pow(3),
            "t" | "tb" => 1000_u64.pow(4),
            "ki" | "kib" => 1 << 10,
            "mi" | "mib" => 1 << 20,
            "gi" | "gib" => 1 << 30,
            "ti" | "tib" => 1 << 40,
            _ => return Err(ByteSizeError::UnknownUnit),
        };
        if let Ok(n) = num.parse::<u64>() {
            return n
                .checked_mul(mult)
                .map(Bytes)
                .ok_or(ByteSizeError::TooLarge);
        }
        let f: f64 = num.parse().map_err(|_| ByteSizeError::NoNumber)?;
        if !f.is_finite() || f < 0.0 {
            return Err(ByteSizeError::Invalid);
        }
        let total = f * mult as f64;
        if total >= u64::MAX as f64 {
            return Err(ByteSizeError::TooLarge);
        }
        Ok(Bytes(total.round() as u64))
    }
}

/// A byte size as written in a file: an integer number of bytes or a string with a unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ByteSize {
    /// A number of bytes.
    Count(u64),
    /// A string such as `"512MiB"`.
    Text(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte size such as 4096 or \"512MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize::Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize::Count)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                Ok(ByteSize::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl From<&str> for ByteSize {
    fn from(s: &str) -> Self {
        ByteSize::Text(s.to_string())
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ByteSize::Count(n) => write!(f, "{n}"),
            ByteSize::Text(s) => write!(f, "{s:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(Bytes::parse("512MiB"), Ok(Bytes(512 << 20)));
        assert_eq!(Bytes::parse("1.5 GB"), Ok(Bytes(1_500_000_000)));
        assert_eq!(Bytes::parse("4096"), Ok(Bytes(4096)));
        assert_eq!(Bytes::parse("64k"), Ok(Bytes(64_000)));
        assert_eq!(Bytes::parse("1_024 B"), Ok(Bytes(1024)));
        assert_eq!(Bytes::parse(""), Err(ByteSizeError::NoNumber));
        assert_eq!(Bytes::parse("MiB"), Err(ByteSizeError::NoNumber));
        assert_eq!(Bytes::parse("5 parsecs"), Err(ByteSizeError::UnknownUnit));
        assert_eq!(
            Bytes::parse("99999999999 TiB"),
            Err(ByteSizeError::TooLarge)
        );
        assert_eq!(Bytes::parse("1.2.3"), Err(ByteSizeError::NoNumber));
    }

    #[test]
    fn byte_display() {
        assert_eq!(Bytes(512 << 20).to_string(), "512MiB");
        assert_eq!(Bytes(1000).to_string(), "1000B");
        assert_eq!(Bytes(1_500_000_000).to_string(), "1.4GiB");
    }

    #[test]
    fn ratio_bounds() {
        assert!(Ratio::new(f64::NAN).is_none());
        assert!(Ratio::new(1.01).is_none());
        assert!(Ratio::new(-0.0).is_some());
        assert_eq!(Ratio::new(0.5).map(Ratio::get), Some(0.5));
    }
}
