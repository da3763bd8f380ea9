//! PostgreSQL values, as `pgoutput` sends them (each type's text output,
//! with the session pinned to `TimeZone=UTC`, `DateStyle=ISO`,
//! `IntervalStyle=iso_8601`, `bytea_output=hex`, `extra_float_digits=3`),
//! turned into typed JSON. The mapping is documented in `docs/wal.md`.

use base64::Engine as _;
use serde_json::{Number, Value};

// Type OIDs of pg_type.dat: stable across PostgreSQL releases.
const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const JSONB: u32 = 3802;

/// The element type of an array type, for the arrays of the types above
/// and of the common text-like types.
fn element_of(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => BOOL,
        1001 => BYTEA,
        1016 => INT8,
        1005 => INT2,
        1007 => INT4,
        1028 => OID,
        199 => JSON,
        1021 => FLOAT4,
        1022 => FLOAT8,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        3807 => JSONB,
        1009 => 25,   // text
        1015 => 1043, // varchar
        1014 => 1042, // bpchar
        1231 => 1700, // numeric
        1182 => 1082, // date
        2951 => 2950, // uuid
        _ => return None,
    })
}

/// The JSON form of one value of type `type_oid` in its text output.
///
/// Integers and finite floats become numbers; `numeric` stays a string (no
/// float rounding); `bool` a boolean; `json`/`jsonb` are inlined; `bytea`
/// becomes base64; timestamps become ISO-8601 (`timestamptz` in UTC with a
/// `Z`); arrays of the known types become JSON arrays; every other type
/// keeps its text output as a string.
pub fn to_json(type_oid: u32, text: &str) -> Value {
    match type_oid {
        BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            other => Value::String(other.to_string()),
        },
        INT2 | INT4 | INT8 | OID => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_string())),
        FLOAT4 | FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            // NaN and ±Infinity have no JSON number.
            .unwrap_or_else(|| Value::String(text.to_string())),
        JSON | JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
        BYTEA => match text.strip_prefix("\\x").and_then(hex_decode) {
            Some(raw) => Value::String(base64::engine::general_purpose::STANDARD.encode(raw)),
            None => Value::String(text.to_string()),
        },
        TIMESTAMP => Value::String(iso_timestamp(text, false)),
        TIMESTAMPTZ => Value::String(iso_timestamp(text, true)),
        other => match element_of(other) {
            Some(element) => match parse_array(text) {
                Some(array) => array_to_json(element, &array),
                None => Value::String(text.to_string()),
            },
            None => Value::String(text.to_string()),
        },
    }
}

pub(crate) fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `2024-01-02 03:04:05.123456+00` → `2024-01-02T03:04:05.123456Z`; without
/// a zone (`timestamp`), no `Z`. `infinity`, `-infinity` and BC dates are
/// kept as the server wrote them.
fn iso_timestamp(text: &str, with_zone: bool) -> String {
    let Some((date, time)) = text.split_once(' ') else {
        return text.to_string();
    };
    if time.contains(' ') {
        return text.to_string(); // "... BC"
    }
    if !with_zone {
        return format!("{date}T{time}");
    }
    // Pinned to UTC, the server writes "+00"; anything else is kept whole.
    match time.strip_suffix("+00") {
        Some(utc) => format!("{date}T{utc}Z"),
        None => format!("{date}T{time}"),
    }
}

/// An array literal's elements: `None` for NULL, nested for more dimensions.
#[derive(Debug, Clone, PartialEq)]
enum Element {
    Null,
    Text(String),
    Nested(Vec<Element>),
}

/// Parses an array's text output (`{1,2,NULL}`, `{"a b","c\"d"}`,
/// `{{1,2},{3,4}}`, `[0:1]={1,2}`); `None` when it is not one.
fn parse_array(text: &str) -> Option<Vec<Element>> {
    // Arrays with non-default bounds carry a dimension prefix.
    let body = match text.find("={") {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let chars: Vec<char> = body.chars().collect();
    let mut at = 0;
    let elements = parse_level(&chars, &mut at)?;
    (at == chars.len()).then_some(elements)
}

fn parse_level(chars: &[char], at: &mut usize) -> Option<Vec<Element>> {
    if chars.get(*at) != Some(&'{') {
        return None;
    }
    *at += 1;
    let mut elements = Vec::new();
    if chars.get(*at) == Some(&'}') {
        *at += 1;
        return Some(elements);
    }
    loop {
        match chars.get(*at)? {
            '{' => elements.push(Element::Nested(parse_level(chars, at)?)),
            '"' => {
                *at += 1;
                let mut value = String::new();
                loop {
                    match chars.get(*at)? {
                        '\\' => {
                            value.push(*chars.get(*at + 1)?);
                            *at += 2;
                        }
                        '"' => {
                            *at += 1;
                            break;
                        }
                        c => {
                            value.push(*c);
                            *at += 1;
                        }
                    }
                }
                elements.push(Element::Text(value));
            }
            _ => {
                let start = *at;
                while !matches!(chars.get(*at)?, ',' | '}') {
                    *at += 1;
                }
                let raw: String = chars[start..*at].iter().collect();
                elements.push(if raw == "NULL" {
                    Element::Null
                } else {
                    Element::Text(raw)
                });
            }
        }
        match chars.get(*at)? {
            ',' => *at += 1,
            '}' => {
                *at += 1;
                return Some(elements);
            }
            _ => return None,
        }
    }
}

fn array_to_json(element: u32, array: &[Element]) -> Value {
    Value::Array(
        array
            .iter()
            .map(|e| match e {
                Element::Null => Value::Null,
                Element::Text(text) => to_json(element, text),
                Element::Nested(inner) => array_to_json(element, inner),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_stay_exact() {
        assert_eq!(
            to_json(INT8, "9223372036854775807"),
            json!(9_223_372_036_854_775_807i64)
        );
        assert_eq!(to_json(INT2, "-5"), json!(-5));
        assert_eq!(
            to_json(1700, "12345678901234567890.000000001"),
            json!("12345678901234567890.000000001")
        );
        assert_eq!(to_json(FLOAT8, "0.1"), json!(0.1));
        assert_eq!(to_json(FLOAT4, "NaN"), json!("NaN"));
        assert_eq!(to_json(FLOAT8, "-Infinity"), json!("-Infinity"));
    }

    #[test]
    fn bytes_json_and_booleans() {
        assert_eq!(to_json(BYTEA, "\\x00ff10"), json!("AP8Q"));
        assert_eq!(
            to_json(JSONB, r#"{"a": [1, null]}"#),
            json!({"a": [1, null]})
        );
        assert_eq!(to_json(BOOL, "t"), json!(true));
        assert_eq!(to_json(BOOL, "f"), json!(false));
    }

    #[test]
    fn timestamps_become_iso_8601() {
        assert_eq!(
            to_json(TIMESTAMPTZ, "2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            to_json(TIMESTAMP, "2024-01-02 03:04:05"),
            json!("2024-01-02T03:04:05")
        );
        assert_eq!(to_json(TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(to_json(1082, "2024-01-02"), json!("2024-01-02"));
    }

    #[test]
    fn arrays_of_known_types_become_json_arrays() {
        assert_eq!(to_json(1007, "{1,NULL,3}"), json!([1, null, 3]));
        assert_eq!(
            to_json(1009, r#"{"a b","c\"d",NULL,"NULL"}"#),
            json!(["a b", "c\"d", null, "NULL"])
        );
        assert_eq!(to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(1007, "[0:1]={7,8}"), json!([7, 8]));
        assert_eq!(to_json(1231, "{1.50,2}"), json!(["1.50", "2"]));
        assert_eq!(to_json(1007, "{}"), json!([]));
        assert_eq!(to_json(1007, "{1,2"), json!("{1,2"));
    }

    #[test]
    fn other_types_keep_their_text() {
        assert_eq!(to_json(25, "héllo"), json!("héllo"));
        assert_eq!(
            to_json(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(to_json(1186, "P1DT2H"), json!("P1DT2H"));
    }
}
