//! SQL identifiers (table, column and sink names): validated here when the config is
//! read, and quoted by the SQL sinks when they build statements.

/// A validated table name, `name` or `schema.name`: as written, and quoted for SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    name: String,
    quoted: String,
}

impl Table {
    /// Checks that `name` (or `schema.name`) is made of plain SQL identifiers.
    pub fn parse(name: &str) -> Result<Table, String> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.is_empty() || parts.len() > 2 {
            return Err(format!("invalid table name {name:?}"));
        }
        let mut quoted = Vec::new();
        for p in parts {
            quoted.push(quote_ident(p).ok_or_else(|| {
                format!("invalid table name {name:?}: use letters, digits and '_' (not starting with a digit)")
            })?);
        }
        Ok(Table {
            name: name.to_string(),
            quoted: quoted.join("."),
        })
    }

    /// The name as written, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted, for statements: `"schema"."name"`.
    pub fn quoted(&self) -> &str {
        &self.quoted
    }

    /// The table's own name without its schema, quoted: `"name"`.
    pub fn quoted_base(&self) -> &str {
        self.quoted.rsplit('.').next().unwrap_or(&self.quoted)
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Quotes a validated identifier: `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes.
pub fn quote_ident(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let ok = first_ok && name.len() <= 63 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then(|| format!("\"{name}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        let quoted = |name| Table::parse(name).unwrap().quoted().to_string();
        assert_eq!(quoted("readings"), "\"readings\"");
        assert_eq!(quoted("main.readings"), "\"main\".\"readings\"");
        let table = Table::parse("main.readings").unwrap();
        assert_eq!(
            (table.name(), table.quoted_base()),
            ("main.readings", "\"readings\"")
        );
        for bad in ["", "a b", "x;drop", "1abc", "a.b.c", "r\"x"] {
            assert!(Table::parse(bad).is_err(), "{bad}");
        }
    }
}
