//! Column types the table-driven encoder writes, and JSON values encoded to
//! RowBinary by them. Pure: no I/O.
//!
//! A value that does not fit its column (overflow, a bad date, the wrong
//! JSON type) is a [`Misfit`] for that one record; a type the encoder does
//! not know is refused once, when the table is read.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use clickhouse_types::data_types::{DateTimePrecision, DecimalType, EnumType};
use clickhouse_types::DataTypeNode;
use serde_json::Value;
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{Date, OffsetDateTime, PrimitiveDateTime};

/// Why a value cannot be written to its column.
pub(crate) type Misfit = String;

/// A column type the encoder can write.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ColumnType {
    /// An integer of `bytes` (1, 2, 4, 8 or 16) bytes.
    Int {
        bytes: u8,
        signed: bool,
    },
    Float32,
    Float64,
    Bool,
    /// Stored as a signed integer of `bytes` bytes: the value times 10^scale.
    Decimal {
        precision: u8,
        scale: u8,
        bytes: u8,
    },
    String,
    FixedString(usize),
    Uuid,
    Date,
    Date32,
    DateTime,
    DateTime64 {
        precision: u8,
    },
    Enum {
        wide: bool,
        values: HashMap<String, i16>,
    },
    IPv4,
    IPv6,
    Nullable(Box<ColumnType>),
    Array(Box<ColumnType>),
    Map(Box<ColumnType>, Box<ColumnType>),
    Tuple(Vec<ColumnType>),
}

impl ColumnType {
    /// The encoder's type for a ClickHouse type name as the server prints it,
    /// or why it cannot write it.
    pub(crate) fn parse(name: &str) -> Result<Self, String> {
        let node = DataTypeNode::new(name).map_err(|e| e.to_string())?;
        Self::from_node(&node)
    }

    fn from_node(node: &DataTypeNode) -> Result<Self, String> {
        use DataTypeNode as N;
        let int = |bytes, signed| Ok(ColumnType::Int { bytes, signed });
        match node {
            N::Int8 => int(1, true),
            N::Int16 => int(2, true),
            N::Int32 => int(4, true),
            N::Int64 => int(8, true),
            N::Int128 => int(16, true),
            N::UInt8 => int(1, false),
            N::UInt16 => int(2, false),
            N::UInt32 => int(4, false),
            N::UInt64 => int(8, false),
            N::UInt128 => int(16, false),
            N::Float32 => Ok(Self::Float32),
            N::Float64 => Ok(Self::Float64),
            N::Bool => Ok(Self::Bool),
            N::Decimal(precision, scale, size) => {
                let bytes = match size {
                    DecimalType::Decimal32 => 4,
                    DecimalType::Decimal64 => 8,
                    DecimalType::Decimal128 => 16,
                    DecimalType::Decimal256 => {
                        return Err("Decimal256 is not supported (precision above 38)".into())
                    }
                };
                Ok(Self::Decimal {
                    precision: *precision,
                    scale: *scale,
                    bytes,
                })
            }
            N::String => Ok(Self::String),
            N::FixedString(n) => Ok(Self::FixedString(*n)),
            N::UUID => Ok(Self::Uuid),
            N::Date => Ok(Self::Date),
            N::Date32 => Ok(Self::Date32),
            N::DateTime(_) => Ok(Self::DateTime),
            N::DateTime64(precision, _) => Ok(Self::DateTime64 {
                precision: precision_digits(precision),
            }),
            N::Enum(kind, values) => Ok(Self::Enum {
                wide: matches!(kind, EnumType::Enum16),
                values: values.iter().map(|(v, name)| (name.clone(), *v)).collect(),
            }),
            N::IPv4 => Ok(Self::IPv4),
            N::IPv6 => Ok(Self::IPv6),
            N::Nullable(inner) => Ok(Self::Nullable(Box::new(Self::from_node(inner)?))),
            // Both are written as their inner type in RowBinary.
            N::LowCardinality(inner) | N::SimpleAggregateFunction(_, inner) => {
                Self::from_node(inner)
            }
            N::Array(inner) => Ok(Self::Array(Box::new(Self::from_node(inner)?))),
            N::Map([key, value]) => Ok(Self::Map(
                Box::new(Self::from_node(key)?),
                Box::new(Self::from_node(value)?),
            )),
            N::Tuple(items) => Ok(Self::Tuple(
                items
                    .iter()
                    .map(Self::from_node)
                    .collect::<Result<_, _>>()?,
            )),
            other => Err(format!(
                "{other} is not supported by the table-driven encoder"
            )),
        }
    }

    /// Whether `null` is a value of this type (else a `null` field is
    /// treated as a missing one).
    pub(crate) fn is_nullable(&self) -> bool {
        matches!(self, Self::Nullable(_))
    }

    /// Appends the JSON text `raw` (one value) in RowBinary: a string
    /// without escapes into a `String` column is copied as it is, anything
    /// else goes through [`ColumnType::encode`].
    pub(crate) fn encode_raw(&self, raw: &str, out: &mut Vec<u8>) -> Result<(), Misfit> {
        // Only a string is tried as one: a failed parse builds an error.
        if matches!(self, Self::String) && raw.starts_with('"') {
            if let Ok(text) = serde_json::from_str::<&str>(raw) {
                put_bytes(text.as_bytes(), out);
                return Ok(());
            }
        }
        let value: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        self.encode(&value, out)
    }

    /// Appends `value` in RowBinary.
    pub(crate) fn encode(&self, value: &Value, out: &mut Vec<u8>) -> Result<(), Misfit> {
        match self {
            Self::Int { bytes, signed } => match integer(value) {
                Ok(n) => put_int(n, *bytes, *signed, out),
                // Only UInt128 holds what is beyond i128.
                Err(misfit) => match huge(value) {
                    Some(n) if *bytes == 16 && !*signed => {
                        out.extend_from_slice(&n.to_le_bytes());
                        Ok(())
                    }
                    Some(n) => Err(format!(
                        "{n} is out of the range of {}Int{}",
                        if *signed { "" } else { "U" },
                        u32::from(*bytes) * 8
                    )),
                    None => Err(misfit),
                },
            },
            Self::Float32 => {
                let f = float(value)?;
                let narrow = f as f32;
                if f.is_finite() && !narrow.is_finite() {
                    return Err(format!("{f} is out of the range of Float32"));
                }
                out.extend_from_slice(&narrow.to_le_bytes());
                Ok(())
            }
            Self::Float64 => {
                out.extend_from_slice(&float(value)?.to_le_bytes());
                Ok(())
            }
            Self::Bool => {
                out.push(u8::from(boolean(value)?));
                Ok(())
            }
            Self::Decimal {
                precision,
                scale,
                bytes,
            } => {
                let n = decimal(&number_text(value)?, *scale, Excess::Refuse)?;
                let limit = 10i128.pow(u32::from(*precision));
                if n.abs() >= limit {
                    return Err(format!(
                        "{} does not fit Decimal({precision}, {scale})",
                        number_text(value)?
                    ));
                }
                put_int(n, *bytes, true, out)
            }
            Self::String => {
                let text = match value {
                    Value::String(s) => s.clone(),
                    // An object, array, number or bool is kept as its JSON text.
                    other => other.to_string(),
                };
                put_bytes(text.as_bytes(), out);
                Ok(())
            }
            Self::FixedString(n) => {
                let s = string(value)?;
                if s.len() > *n {
                    return Err(format!("{} bytes do not fit FixedString({n})", s.len()));
                }
                out.extend_from_slice(s.as_bytes());
                out.resize(out.len() + (n - s.len()), 0);
                Ok(())
            }
            Self::Uuid => {
                let s = string(value)?;
                let id =
                    uuid::Uuid::parse_str(s).map_err(|e| format!("{s:?} is not a UUID: {e}"))?;
                // RowBinary stores the two halves, each little-endian.
                let (high, low) = id.as_u64_pair();
                out.extend_from_slice(&high.to_le_bytes());
                out.extend_from_slice(&low.to_le_bytes());
                Ok(())
            }
            Self::Date => {
                let days = days(value)?;
                let days = u16::try_from(days).map_err(|_| {
                    format!("{value} is outside Date's range (1970-01-01 to 2149-06-06)")
                })?;
                out.extend_from_slice(&days.to_le_bytes());
                Ok(())
            }
            Self::Date32 => {
                let days = i32::try_from(days(value)?)
                    .map_err(|_| format!("{value} is outside Date32's range"))?;
                out.extend_from_slice(&days.to_le_bytes());
                Ok(())
            }
            Self::DateTime => {
                let seconds = ticks(value, 0)?;
                let seconds = u32::try_from(seconds)
                    .map_err(|_| format!("{value} is outside DateTime's range (1970 to 2106)"))?;
                out.extend_from_slice(&seconds.to_le_bytes());
                Ok(())
            }
            Self::DateTime64 { precision } => {
                let ticks = i64::try_from(ticks(value, *precision)?)
                    .map_err(|_| format!("{value} is outside DateTime64's range"))?;
                out.extend_from_slice(&ticks.to_le_bytes());
                Ok(())
            }
            Self::Enum { wide, values } => {
                let code = match value {
                    Value::String(name) => *values
                        .get(name)
                        .ok_or_else(|| format!("{name:?} is not a value of the enum"))?,
                    Value::Number(_) => {
                        let n = integer(value)?;
                        let code = i16::try_from(n)
                            .map_err(|_| format!("{n} is not a value of the enum"))?;
                        if !values.values().any(|v| *v == code) {
                            return Err(format!("{n} is not a value of the enum"));
                        }
                        code
                    }
                    other => return Err(format!("expected an enum name, found {}", kind(other))),
                };
                if *wide {
                    out.extend_from_slice(&code.to_le_bytes());
                } else {
                    let code =
                        i8::try_from(code).map_err(|_| format!("{code} does not fit Enum8"))?;
                    out.extend_from_slice(&code.to_le_bytes());
                }
                Ok(())
            }
            Self::IPv4 => {
                let s = string(value)?;
                let ip: Ipv4Addr = s
                    .parse()
                    .map_err(|_| format!("{s:?} is not an IPv4 address"))?;
                out.extend_from_slice(&u32::from(ip).to_le_bytes());
                Ok(())
            }
            Self::IPv6 => {
                let s = string(value)?;
                let ip: Ipv6Addr = match s.parse() {
                    Ok(ip) => ip,
                    Err(_) => s
                        .parse::<Ipv4Addr>()
                        .map(|v4| v4.to_ipv6_mapped())
                        .map_err(|_| format!("{s:?} is not an IPv6 address"))?,
                };
                out.extend_from_slice(&ip.octets());
                Ok(())
            }
            Self::Nullable(inner) => {
                if value.is_null() {
                    out.push(1);
                    Ok(())
                } else {
                    out.push(0);
                    inner.encode(value, out)
                }
            }
            Self::Array(inner) => {
                let Value::Array(items) = value else {
                    return Err(format!("expected an array, found {}", kind(value)));
                };
                put_len(items.len(), out);
                for (i, item) in items.iter().enumerate() {
                    inner.encode(item, out).map_err(|e| format!("[{i}]: {e}"))?;
                }
                Ok(())
            }
            Self::Map(key, item) => {
                let Value::Object(entries) = value else {
                    return Err(format!("expected an object, found {}", kind(value)));
                };
                put_len(entries.len(), out);
                for (k, v) in entries {
                    key.encode(&Value::String(k.clone()), out)
                        .map_err(|e| format!("key {k:?}: {e}"))?;
                    item.encode(v, out).map_err(|e| format!("[{k:?}]: {e}"))?;
                }
                Ok(())
            }
            Self::Tuple(items) => {
                let Value::Array(values) = value else {
                    return Err(format!(
                        "expected an array of {} items, found {}",
                        items.len(),
                        kind(value)
                    ));
                };
                if values.len() != items.len() {
                    return Err(format!(
                        "expected an array of {} items, found {}",
                        items.len(),
                        values.len()
                    ));
                }
                for (i, (ty, v)) in items.iter().zip(values).enumerate() {
                    ty.encode(v, out).map_err(|e| format!("[{i}]: {e}"))?;
                }
                Ok(())
            }
        }
    }

    /// Appends the value ClickHouse gives a column of this type that has no
    /// `DEFAULT` expression when it is left out of an insert.
    pub(crate) fn encode_default(&self, out: &mut Vec<u8>) {
        match self {
            Self::Int { bytes, .. } | Self::Decimal { bytes, .. } => {
                out.resize(out.len() + usize::from(*bytes), 0)
            }
            Self::Float32 | Self::Date32 | Self::DateTime | Self::IPv4 => {
                out.extend_from_slice(&[0; 4])
            }
            Self::Float64 | Self::DateTime64 { .. } => out.extend_from_slice(&[0; 8]),
            Self::Bool => out.push(0),
            Self::Date => out.extend_from_slice(&[0; 2]),
            Self::String | Self::Array(_) | Self::Map(..) => out.push(0),
            Self::FixedString(n) => out.resize(out.len() + n, 0),
            Self::Uuid | Self::IPv6 => out.extend_from_slice(&[0; 16]),
            Self::Enum { wide, values } => {
                // The first value in the enum's order, as ClickHouse does.
                let first = values.values().min().copied().unwrap_or(0);
                if *wide {
                    out.extend_from_slice(&first.to_le_bytes());
                } else {
                    out.push(first.to_le_bytes()[0]);
                }
            }
            Self::Nullable(_) => out.push(1),
            Self::Tuple(items) => items.iter().for_each(|t| t.encode_default(out)),
        }
    }
}

fn precision_digits(p: &DateTimePrecision) -> u8 {
    use DateTimePrecision as P;
    match p {
        P::Precision0 => 0,
        P::Precision1 => 1,
        P::Precision2 => 2,
        P::Precision3 => 3,
        P::Precision4 => 4,
        P::Precision5 => 5,
        P::Precision6 => 6,
        P::Precision7 => 7,
        P::Precision8 => 8,
        P::Precision9 => 9,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string(value: &Value) -> Result<&str, Misfit> {
    value
        .as_str()
        .ok_or_else(|| format!("expected a string, found {}", kind(value)))
}

/// An integer from a JSON integer, a float without a fraction, or a
/// string holding an integer (how 64-bit ids often travel in JSON).
fn integer(value: &Value) -> Result<i128, Misfit> {
    match value {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u))
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
                    Ok(f as i128)
                } else {
                    Err(format!("{n} is not an integer"))
                }
            }
        }
        Value::String(s) => s
            .trim()
            .parse::<i128>()
            .map_err(|_| format!("{s:?} is not an integer")),
        Value::Bool(b) => Ok(i128::from(*b)),
        other => Err(format!("expected an integer, found {}", kind(other))),
    }
}

/// An integer above `i128::MAX` (a `UInt128` near its top), as text.
fn huge(value: &Value) -> Option<u128> {
    match value {
        Value::String(s) => s
            .trim()
            .parse::<u128>()
            .ok()
            .filter(|n| *n > i128::MAX as u128),
        _ => None,
    }
}

fn put_int(n: i128, bytes: u8, signed: bool, out: &mut Vec<u8>) -> Result<(), Misfit> {
    let bits = u32::from(bytes) * 8;
    let fits = if signed {
        bits >= 128 || (-(1i128 << (bits - 1))..(1i128 << (bits - 1))).contains(&n)
    } else {
        n >= 0 && (bits >= 128 || n < (1i128 << bits))
    };
    if !fits {
        let name = if signed { "Int" } else { "UInt" };
        return Err(format!("{n} is out of the range of {name}{bits}"));
    }
    out.extend_from_slice(&n.to_le_bytes()[..usize::from(bytes)]);
    Ok(())
}

fn float(value: &Value) -> Result<f64, Misfit> {
    match value {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a number")),
        // NaN and infinities cannot travel as JSON numbers.
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a number")),
        other => Err(format!("expected a number, found {}", kind(other))),
    }
}

fn boolean(value: &Value) -> Result<bool, Misfit> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::Number(_) => match integer(value)? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(format!("{n} is not a boolean")),
        },
        Value::String(s) => match s.as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(format!("{s:?} is not a boolean")),
        },
        other => Err(format!("expected a boolean, found {}", kind(other))),
    }
}

fn number_text(value: &Value) -> Result<String, Misfit> {
    match value {
        Value::Number(n) => Ok(n.to_string()),
        Value::String(s) => Ok(s.trim().to_string()),
        other => Err(format!("expected a decimal number, found {}", kind(other))),
    }
}

/// What to do with digits beyond the scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Excess {
    /// A misfit unless they are zeros: a decimal column never rounds silently.
    Refuse,
    /// Cut toward minus infinity: time below a column's precision.
    Floor,
}

/// `text` (`-12.340`, `1e3`, `5`) as an integer count of 10^-scale.
fn decimal(text: &str, scale: u8, excess: Excess) -> Result<i128, Misfit> {
    let bad = || format!("{text:?} is not a decimal number");
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (
            &text[..at],
            text[at + 1..].parse::<i32>().map_err(|_| bad())?,
        ),
        None => (text, 0),
    };
    let (negative, digits) = match mantissa.as_bytes().first() {
        Some(b'-') => (true, &mantissa[1..]),
        Some(b'+') => (false, &mantissa[1..]),
        _ => (false, mantissa),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // value = digits * 10^(exponent - fraction digits); we want value * 10^scale.
    let shift = i64::from(exponent) - fraction.len() as i64 + i64::from(scale);
    let all: Vec<u8> = whole.bytes().chain(fraction.bytes()).collect();
    let (kept, dropped) = if shift < 0 {
        let cut = usize::try_from(-shift).unwrap_or(usize::MAX).min(all.len());
        all.split_at(all.len() - cut)
    } else {
        (all.as_slice(), &[][..])
    };
    let cut_nonzero = dropped.iter().any(|d| *d != b'0');
    if cut_nonzero && excess == Excess::Refuse {
        return Err(format!("{text} has more than {scale} decimal places"));
    }
    let overflow = || format!("{text} is too large");
    let mut n: i128 = 0;
    for d in kept {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i128::from(d - b'0')))
            .ok_or_else(overflow)?;
    }
    if shift > 0 {
        let factor = u32::try_from(shift)
            .ok()
            .and_then(|s| 10i128.checked_pow(s))
            .ok_or_else(overflow)?;
        n = n.checked_mul(factor).ok_or_else(overflow)?;
    }
    if negative {
        // Floor: a cut negative value moves down, as time before the epoch must.
        n = -n - i128::from(cut_nonzero);
    }
    Ok(n)
}

/// Days since 1970-01-01 from `YYYY-MM-DD` or a number of days.
fn days(value: &Value) -> Result<i64, Misfit> {
    match value {
        Value::String(s) => {
            let date = Date::parse(s.trim(), &Iso8601::DEFAULT)
                .map_err(|_| format!("{s:?} is not a date (YYYY-MM-DD)"))?;
            Ok(i64::from(date.to_julian_day() - UNIX_EPOCH_JULIAN_DAY))
        }
        Value::Number(_) => {
            i64::try_from(integer(value)?).map_err(|_| format!("{value} is out of range"))
        }
        other => Err(format!("expected a date, found {}", kind(other))),
    }
}

const UNIX_EPOCH_JULIAN_DAY: i32 = 2_440_588;

/// A point in time as a count of 10^-precision seconds since the epoch:
/// from ISO-8601 text (`T` or a space between date and time; a zone
/// offset or `Z`, else UTC; a date alone is its midnight UTC) or from a
/// number of seconds. Digits below the precision are cut.
fn ticks(value: &Value, precision: u8) -> Result<i128, Misfit> {
    match value {
        Value::String(s) => {
            let at =
                parse_time(s.trim()).ok_or_else(|| format!("{s:?} is not an ISO-8601 time"))?;
            let nanos = at.unix_timestamp_nanos();
            let per_tick = 10i128.pow(9 - u32::from(precision.min(9)));
            Ok(nanos.div_euclid(per_tick))
        }
        Value::Number(n) => decimal(&n.to_string(), precision, Excess::Floor),
        other => Err(format!("expected a time, found {}", kind(other))),
    }
}

fn parse_time(text: &str) -> Option<OffsetDateTime> {
    let normal;
    let text = match text.as_bytes().get(10) {
        Some(b' ') => {
            normal = format!("{}T{}", &text[..10], &text[11..]);
            normal.as_str()
        }
        _ => text,
    };
    // RFC 3339 (what most producers write) is the fast parse; ISO 8601's
    // other forms after it.
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(at);
    }
    if let Ok(at) = OffsetDateTime::parse(text, &Iso8601::DEFAULT) {
        return Some(at);
    }
    if let Ok(at) = PrimitiveDateTime::parse(text, &Iso8601::DEFAULT) {
        return Some(at.assume_utc());
    }
    Date::parse(text, &Iso8601::DEFAULT)
        .ok()
        .map(|d| d.midnight().assume_utc())
}

fn put_len(len: usize, out: &mut Vec<u8>) {
    let mut n = len as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
}

fn put_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    put_len(bytes.len(), out);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(ty: &str, value: Value) -> Result<Vec<u8>, Misfit> {
        let ty = ColumnType::parse(ty)?;
        let mut out = Vec::new();
        ty.encode(&value, &mut out)?;
        Ok(out)
    }

    #[test]
    fn integers_are_little_endian_and_checked_against_their_range() {
        assert_eq!(enc("Int16", json!(-2)), Ok(vec![0xfe, 0xff]));
        assert_eq!(enc("UInt8", json!(255)), Ok(vec![255]));
        assert_eq!(
            enc("UInt64", json!("18446744073709551615")),
            Ok(vec![255; 8])
        );
        assert_eq!(enc("Int32", json!(7.0)), Ok(vec![7, 0, 0, 0]));
        assert!(enc("UInt8", json!(256))
            .unwrap_err()
            .contains("out of the range of UInt8"));
        assert!(enc("UInt32", json!(-1)).is_err());
        assert!(enc("Int64", json!(1.5))
            .unwrap_err()
            .contains("not an integer"));
        assert!(enc("Int64", json!([1]))
            .unwrap_err()
            .contains("found an array"));
        assert_eq!(enc("Int128", json!("-1")), Ok(vec![255; 16]));
        let top = "340282366920938463463374607431768211455";
        assert_eq!(enc("UInt128", json!(top)), Ok(vec![255; 16]));
        assert!(enc("Int128", json!(top))
            .unwrap_err()
            .contains("out of the range of Int128"));
        assert!(enc("UInt64", json!(top))
            .unwrap_err()
            .contains("out of the range of UInt64"));
    }

    #[test]
    fn decimals_are_exact_and_never_rounded() {
        // 12.34 in Decimal(9, 2) is 1234 as an Int32.
        assert_eq!(
            enc("Decimal(9, 2)", json!("12.34")),
            Ok(1234i32.to_le_bytes().to_vec())
        );
        assert_eq!(
            enc("Decimal(9, 2)", json!(12.3)),
            Ok(1230i32.to_le_bytes().to_vec())
        );
        assert_eq!(
            enc("Decimal(18, 3)", json!("-1.5e2")),
            Ok((-150_000i64).to_le_bytes().to_vec())
        );
        assert_eq!(
            enc("Decimal(9, 2)", json!("1.500")),
            Ok(150i32.to_le_bytes().to_vec())
        );
        assert_eq!(
            enc(
                "Decimal(38, 10)",
                json!("1234567890123456789012345678.0123456789")
            ),
            Ok(12_345_678_901_234_567_890_123_456_780_123_456_789i128
                .to_le_bytes()
                .to_vec())
        );
        assert!(enc("Decimal(9, 2)", json!("1.005"))
            .unwrap_err()
            .contains("more than 2 decimal places"));
        assert!(enc("Decimal(4, 2)", json!("100.00"))
            .unwrap_err()
            .contains("does not fit Decimal(4, 2)"));
        assert!(enc("Decimal(9, 2)", json!("1.2.3")).is_err());
        assert!(enc("Decimal(9, 2)", json!("")).is_err());
        assert!(enc("Decimal(9, 2)", json!(true)).is_err());
    }

    #[test]
    fn strings_carry_text_and_other_json_as_its_text() {
        assert_eq!(enc("String", json!("hé")), Ok(vec![3, b'h', 0xc3, 0xa9]));
        assert_eq!(
            enc("String", json!({"a": 1})),
            Ok([&[7u8][..], b"{\"a\":1}"].concat())
        );
        assert_eq!(enc("FixedString(3)", json!("ab")), Ok(vec![b'a', b'b', 0]));
        assert!(enc("FixedString(1)", json!("ab"))
            .unwrap_err()
            .contains("do not fit FixedString(1)"));
        let long = "x".repeat(200);
        let out = enc("LowCardinality(String)", json!(long)).unwrap_or_default();
        assert_eq!(
            &out[..2],
            &[200, 1],
            "a length over 127 takes two LEB128 bytes"
        );
    }

    #[test]
    fn uuids_are_two_little_endian_halves() -> Result<(), Misfit> {
        let out = enc("UUID", json!("00112233-4455-6677-8899-aabbccddeeff"))?;
        assert_eq!(
            out,
            [
                0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00, 0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa,
                0x99, 0x88
            ]
        );
        assert!(enc("UUID", json!("nope")).is_err());
        Ok(())
    }

    #[test]
    fn times_come_from_iso_8601_or_epoch_numbers() {
        let day = 19_724u16; // 2024-01-02
        assert_eq!(
            enc("Date", json!("2024-01-02")),
            Ok(day.to_le_bytes().to_vec())
        );
        assert_eq!(enc("Date", json!(19_724)), Ok(day.to_le_bytes().to_vec()));
        assert!(enc("Date", json!("1969-12-31"))
            .unwrap_err()
            .contains("outside Date's range"));
        assert!(enc("Date", json!("2024-02-30"))
            .unwrap_err()
            .contains("not a date"));
        assert_eq!(
            enc("Date32", json!("1969-12-31")),
            Ok((-1i32).to_le_bytes().to_vec())
        );
        let t = 1_704_164_645u32; // 2024-01-02T03:04:05Z
        for text in [
            "2024-01-02T03:04:05Z",
            "2024-01-02 03:04:05",
            "2024-01-02T05:04:05.999+02:00",
        ] {
            assert_eq!(
                enc("DateTime", json!(text)),
                Ok(t.to_le_bytes().to_vec()),
                "{text}"
            );
        }
        assert_eq!(
            enc("DateTime('Europe/Berlin')", json!(t)),
            Ok(t.to_le_bytes().to_vec())
        );
        assert!(enc("DateTime", json!("1960-01-01T00:00:00Z")).is_err());
        assert!(enc("DateTime", json!("yesterday"))
            .unwrap_err()
            .contains("not an ISO-8601 time"));
        let ms = 1_704_164_645_123i64;
        assert_eq!(
            enc("DateTime64(3)", json!("2024-01-02T03:04:05.123456Z")),
            Ok(ms.to_le_bytes().to_vec())
        );
        assert_eq!(
            enc("DateTime64(3, 'UTC')", json!(1_704_164_645.123)),
            Ok(ms.to_le_bytes().to_vec())
        );
        assert_eq!(
            enc("DateTime64(6)", json!("1969-12-31T23:59:59.5Z")),
            Ok((-500_000i64).to_le_bytes().to_vec())
        );
        assert_eq!(
            enc("DateTime64(0)", json!(-0.5)),
            Ok((-1i64).to_le_bytes().to_vec())
        );
    }

    #[test]
    fn enums_take_names_and_defined_values() {
        let ty = "Enum8('login' = 1, 'logout' = -2)";
        assert_eq!(enc(ty, json!("logout")), Ok(vec![0xfe]));
        assert_eq!(enc(ty, json!(1)), Ok(vec![1]));
        assert!(enc(ty, json!("signup"))
            .unwrap_err()
            .contains("not a value of the enum"));
        assert!(enc(ty, json!(3)).is_err());
        assert_eq!(
            enc("Enum16('a' = 1000)", json!("a")),
            Ok(1000i16.to_le_bytes().to_vec())
        );
    }

    #[test]
    fn nullable_arrays_maps_and_tuples_nest() {
        assert_eq!(enc("Nullable(Int8)", json!(null)), Ok(vec![1]));
        assert_eq!(enc("Nullable(Int8)", json!(5)), Ok(vec![0, 5]));
        assert_eq!(
            enc("Array(Nullable(UInt8))", json!([1, null])),
            Ok(vec![2, 0, 1, 1])
        );
        assert!(enc("Array(UInt8)", json!([1, 300]))
            .unwrap_err()
            .starts_with("[1]: "));
        assert_eq!(
            enc("Map(String, UInt16)", json!({"a": 1})),
            Ok(vec![1, 1, b'a', 1, 0])
        );
        assert_eq!(
            enc("Map(UInt8, String)", json!({"7": "x"})),
            Ok(vec![1, 7, 1, b'x'])
        );
        assert_eq!(
            enc("Tuple(UInt8, String)", json!([1, "x"])),
            Ok(vec![1, 1, b'x'])
        );
        assert!(enc("Tuple(UInt8, String)", json!([1])).is_err());
        assert_eq!(
            enc("Array(Array(Int8))", json!([[1], []])),
            Ok(vec![2, 1, 1, 0])
        );
    }

    /// The float a JSON number names is the nearest double: serde_json's
    /// default parser missed -2.25e-300 by one unit in the last place.
    #[test]
    fn floats_parse_to_the_nearest_double() -> Result<(), serde_json::Error> {
        for text in ["-2.25e-300", "0.1", "1.7976931348623157e308", "5e-324"] {
            let value: Value = serde_json::from_str(text)?;
            let nearest: f64 = text.parse().unwrap_or(f64::NAN);
            assert_eq!(
                enc("Float64", value),
                Ok(nearest.to_le_bytes().to_vec()),
                "{text}"
            );
        }
        Ok(())
    }

    #[test]
    fn booleans_floats_and_addresses() {
        assert_eq!(enc("Bool", json!(true)), Ok(vec![1]));
        assert_eq!(enc("Bool", json!("false")), Ok(vec![0]));
        assert!(enc("Bool", json!(2)).is_err());
        assert_eq!(
            enc("Float64", json!(1.5)),
            Ok(1.5f64.to_le_bytes().to_vec())
        );
        assert_eq!(enc("Float32", json!("NaN")).map(|b| b.len()), Ok(4));
        assert!(enc("Float32", json!(1e300))
            .unwrap_err()
            .contains("Float32"));
        assert_eq!(enc("IPv4", json!("1.2.3.4")), Ok(vec![4, 3, 2, 1]));
        assert_eq!(enc("IPv6", json!("::1")).map(|b| b[15]), Ok(1));
        assert!(enc("IPv4", json!("1.2.3")).is_err());
    }

    #[test]
    fn unknown_types_are_refused_by_name() {
        assert!(ColumnType::parse("Int256")
            .unwrap_err()
            .contains("not supported"));
        assert!(ColumnType::parse("Decimal(50, 2)")
            .unwrap_err()
            .contains("Decimal256"));
        assert!(ColumnType::parse("Point").is_err());
        assert!(ColumnType::parse("Whatever").is_err());
    }

    #[test]
    fn defaults_have_the_width_of_their_type() {
        for (ty, len) in [
            ("UInt64", 8),
            ("String", 1),
            ("Nullable(String)", 1),
            ("FixedString(5)", 5),
            ("UUID", 16),
            ("Date", 2),
            ("DateTime", 4),
            ("Decimal(20, 2)", 16),
            ("Tuple(UInt8, DateTime64(3))", 9),
            ("Array(String)", 1),
        ] {
            let mut out = Vec::new();
            ColumnType::parse(ty)
                .map(|t| t.encode_default(&mut out))
                .unwrap_or_default();
            assert_eq!(out.len(), len, "{ty}");
        }
    }
}
