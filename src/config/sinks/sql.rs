//! SQL identifiers (table, column and sink names): validated here when the config is
//! read, and quoted by the SQL sinks when they build statements.

/// Checks that `name` (or `schema.name`) is a plain SQL identifier and returns it quoted.
pub fn quote_table(name: &str) -> Result<String, String> {
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
    Ok(quoted.join("."))
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
        assert_eq!(quote_table("readings").unwrap(), "\"readings\"");
        assert_eq!(
            quote_table("main.readings").unwrap(),
            "\"main\".\"readings\""
        );
        for bad in ["", "a b", "x;drop", "1abc", "a.b.c", "r\"x"] {
            assert!(quote_table(bad).is_err(), "{bad}");
        }
    }
}
