//! SQL identifiers from configuration, validated before any SQL is built.

use std::fmt;

use crate::PgError;

/// A validated, optionally schema-qualified SQL name such as `outbox` or `app.outbox`.
///
/// Each part must match `[A-Za-z_][A-Za-z0-9_]*` and be at most 63 bytes (the
/// PostgreSQL limit). Display renders it double-quoted, so the name is used
/// exactly as written and can never be read as SQL.
///
/// ```
/// use outbox_pg::SqlName;
///
/// let name = SqlName::parse("app.outbox")?;
/// assert_eq!(name.to_string(), r#""app"."outbox""#);
/// assert!(SqlName::parse("outbox; DROP TABLE users").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SqlName {
    schema: Option<String>,
    name: String,
}

impl SqlName {
    /// Parses and validates `schema.name` or `name`.
    pub fn parse(text: &str) -> Result<Self, PgError> {
        let invalid = |reason: &str| PgError::InvalidIdentifier {
            value: text.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = text.split('.');
        let first = parts.next().unwrap_or_default();
        let second = parts.next();
        if parts.next().is_some() {
            return Err(invalid("at most one '.' (schema.table) is allowed"));
        }
        for part in std::iter::once(first).chain(second) {
            validate_part(part).map_err(invalid)?;
        }
        Ok(match second {
            Some(name) => Self {
                schema: Some(first.to_string()),
                name: name.to_string(),
            },
            None => Self {
                schema: None,
                name: first.to_string(),
            },
        })
    }

    /// The unqualified name, for use in index and constraint names.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name as the user wrote it, unquoted (for messages and for `origin` columns).
    pub fn plain(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// A name derived from this one with a suffix (same schema), e.g. for indexes.
    pub fn with_suffix(&self, suffix: &str) -> Result<Self, PgError> {
        let derived = format!("{}{suffix}", self.name);
        validate_part(&derived).map_err(|reason| PgError::InvalidIdentifier {
            value: derived.clone(),
            reason: reason.to_string(),
        })?;
        Ok(Self {
            schema: self.schema.clone(),
            name: derived,
        })
    }
}

/// A validated single identifier (a column name), rendered double-quoted.
///
/// ```
/// use outbox_pg::SqlIdent;
///
/// assert_eq!(SqlIdent::parse("sent_to_kafka")?.to_string(), r#""sent_to_kafka""#);
/// assert!(SqlIdent::parse("a\"b").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SqlIdent(String);

impl SqlIdent {
    /// Parses and validates one identifier.
    pub fn parse(text: &str) -> Result<Self, PgError> {
        validate_part(text).map_err(|reason| PgError::InvalidIdentifier {
            value: text.to_string(),
            reason: reason.to_string(),
        })?;
        Ok(Self(text.to_string()))
    }

    /// The identifier unquoted.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate_part(part: &str) -> Result<(), &'static str> {
    if part.is_empty() {
        return Err("it is empty");
    }
    if part.len() > 63 {
        return Err("it is longer than 63 bytes");
    }
    let mut chars = part.chars();
    let first = chars.next().unwrap_or('0');
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err("it must start with a letter or '_'");
    }
    if !part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("only letters, digits and '_' are allowed");
    }
    Ok(())
}

impl fmt::Display for SqlName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(schema) = &self.schema {
            write!(f, "\"{schema}\".")?;
        }
        write!(f, "\"{}\"", self.name)
    }
}

impl fmt::Display for SqlIdent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_hostile_names() {
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "x\"; drop table t; --",
            "a.b.c",
            ".a",
            "a.",
            "é",
            &"a".repeat(64),
        ] {
            assert!(SqlName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn accepts_plain_and_qualified() -> Result<(), PgError> {
        assert_eq!(SqlName::parse("outbox")?.plain(), "outbox");
        assert_eq!(SqlName::parse("s_1.T_2")?.to_string(), "\"s_1\".\"T_2\"");
        Ok(())
    }
}
