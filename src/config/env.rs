//! Environment-variable substitution for the rules file.
//!
//! Like Docker Compose and Vector, the substitution is applied to the raw
//! text of the file *before* it is parsed as YAML, so a variable can be used
//! anywhere a scalar can appear (`url: mqtt://${MQTT_HOST:-localhost}:1883`).
//!
//! Supported syntax:
//!
//! * `${NAME}` — the value of `NAME`; an error if it is unset (an empty
//!   value is used as is);
//! * `${NAME:-default}` — the value of `NAME`, or the literal `default` when
//!   `NAME` is unset or empty (as in the shell);
//! * `$$` — a literal `$` (so `$${X}` yields `${X}`);
//! * any other `$` is left unchanged.
//!
//! `NAME` must match `[A-Za-z_][A-Za-z0-9_]*`. Lines whose first non-blank
//! character is `#` (YAML comments) are copied without expansion.
//!
//! Error messages name variables but never include their values, which may
//! be secrets. The result remembers where each value went, so that later
//! messages can name the variable behind a setting (see [`Expanded::variable_of`]).

use super::locate::Position;

/// The text after substitution, and where each variable went in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    pub text: String,
    /// Every reference replaced, in order.
    pub substitutions: Vec<Substitution>,
}

/// A `${NAME}` or `${NAME:-default}` replaced by its value (or default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Substitution {
    pub name: String,
    /// Where the value starts in the expanded text (a value holds no line break).
    pub start: Position,
    /// Length of the value, in characters.
    pub chars: usize,
}

impl Expanded {
    /// The variable a whole scalar was written as: `value`, found at `position` in the
    /// expanded text (just inside a quote, if quoted), is exactly one substitution. E.g.
    /// `listen: ${MQBRIDGE_LISTEN:-127.0.0.1:1883}` gives `MQBRIDGE_LISTEN`, and
    /// `url: mqtt://${HOST}` nothing.
    #[must_use]
    pub fn variable_of(&self, position: Position, value: &str) -> Option<&str> {
        let quoted = Position {
            column: position.column + 1,
            ..position
        };
        self.substitutions
            .iter()
            .find(|s| {
                (s.start == position || s.start == quoted) && s.chars == value.chars().count()
            })
            .map(|s| s.name.as_str())
    }

    /// Appends `value` as the substitution of `name`, on line `line` of the text.
    fn substitute(&mut self, name: &str, value: &str, line: usize) {
        let line_start = self.text.rfind('\n').map_or(0, |i| i + 1);
        self.substitutions.push(Substitution {
            name: name.to_owned(),
            start: Position {
                line,
                column: self.text[line_start..].chars().count() + 1,
            },
            chars: value.chars().count(),
        });
        self.text.push_str(value);
    }
}

/// A substitution error, positioned at the `$` that starts the reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct EnvError {
    /// 1-based line of the `$`.
    pub line: usize,
    /// 1-based column (in characters) of the `$`.
    pub column: usize,
    /// What went wrong; never contains a variable's value.
    pub message: String,
}

/// Expands `${NAME}`, `${NAME:-default}` and `$$` in `text`, looking
/// variables up with `lookup` (typically `|name| std::env::var(name).ok()`).
///
/// The default text is literal: it is not itself expanded, and it ends at the
/// first `}`. A reference must be closed on the line where it starts.
///
/// # Errors
///
/// Returns every problem found (not just the first): a variable that is
/// unset and has no default, an unterminated `${`, an invalid variable name,
/// and a value containing a line break (which would change the structure of
/// the YAML document).
pub fn expand(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Expanded, Vec<EnvError>> {
    let mut out = Expanded {
        text: String::with_capacity(text.len()),
        substitutions: Vec::new(),
    };
    let mut errors = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.text.push_str(line);
        } else {
            expand_line(line, index + 1, &lookup, &mut out, &mut errors);
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Expands one line (including its line terminator, if any) into `out`.
fn expand_line(
    line: &str,
    line_no: usize,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut Expanded,
    errors: &mut Vec<EnvError>,
) {
    let error_at = |byte: usize, message: String| EnvError {
        line: line_no,
        column: line[..byte].chars().count() + 1,
        message,
    };
    let mut pos = 0;
    while let Some(offset) = line[pos..].find('$') {
        let dollar = pos + offset;
        out.text.push_str(&line[pos..dollar]);
        let after = &line[dollar + 1..];
        if after.starts_with('$') {
            out.text.push('$');
            pos = dollar + 2;
        } else if after.starts_with('{') {
            let body_start = dollar + 2;
            let Some(body_len) = line[body_start..].find('}') else {
                errors.push(error_at(
                    dollar,
                    "unterminated variable reference: `${` without a closing `}` on the same line"
                        .to_owned(),
                ));
                out.text.push_str(&line[dollar..]);
                return;
            };
            let body = &line[body_start..body_start + body_len];
            let end = body_start + body_len + 1;
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if is_valid_name(name) {
                let value = lookup(name);
                let inserted = match (value.as_deref(), default) {
                    (Some(""), Some(default)) => Some(default),
                    (Some(value), _) if value.contains(['\n', '\r']) => {
                        errors.push(error_at(
                            dollar,
                            format!("value of {name} contains a line break"),
                        ));
                        None
                    }
                    (Some(value), _) => Some(value),
                    (None, Some(default)) => Some(default),
                    (None, None) => {
                        errors.push(error_at(
                            dollar,
                            format!("environment variable {name} is not set"),
                        ));
                        None
                    }
                };
                if let Some(value) = inserted {
                    out.substitute(name, value, line_no);
                }
            } else {
                errors.push(error_at(
                    dollar,
                    format!(
                        "invalid environment variable name {name:?} \
                         (expected ${{NAME}} or ${{NAME:-default}})"
                    ),
                ));
                out.text.push_str(&line[dollar..end]);
            }
            pos = end;
        } else {
            out.text.push('$');
            pos = dollar + 1;
        }
    }
    out.text.push_str(&line[pos..]);
}

/// `[A-Za-z_][A-Za-z0-9_]*`
pub(crate) fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn plain_variable() {
        let out = expand(
            "url: mqtt://${HOST}:1883\nuser: ${USER_1}\n",
            vars(&[("HOST", "broker.local"), ("USER_1", "bob")]),
        );
        assert_eq!(
            out.unwrap().text,
            "url: mqtt://broker.local:1883\nuser: bob\n"
        );
    }

    #[test]
    fn substitutions_are_placed_in_the_expanded_text() {
        let text = "a: ${A} ${B}\nlisten: ${L:-127.0.0.1:1883}\nq: \"${Q}\"\nurl: mqtt://${B}:1\n";
        let out = expand(text, vars(&[("A", "é1"), ("B", "h"), ("Q", "v")])).unwrap();
        let at = |line, column| Position { line, column };
        let placed: Vec<(&str, Position, usize)> = out
            .substitutions
            .iter()
            .map(|s| (s.name.as_str(), s.start, s.chars))
            .collect();
        assert_eq!(
            placed,
            [
                ("A", at(1, 4), 2),
                ("B", at(1, 7), 1),
                ("L", at(2, 9), 14),
                ("Q", at(3, 5), 1),
                ("B", at(4, 13), 1),
            ]
        );
        // A whole scalar written as a variable, bare or quoted; not part of one.
        assert_eq!(out.variable_of(at(2, 9), "127.0.0.1:1883"), Some("L"));
        assert_eq!(out.variable_of(at(3, 4), "v"), Some("Q"));
        assert_eq!(out.variable_of(at(4, 6), "mqtt://h:1"), None);
        assert_eq!(out.variable_of(at(2, 9), "127.0.0.1:18830"), None);
    }

    #[test]
    fn text_without_references_is_unchanged() {
        let text = "a: 1\r\nb: [x, y]\n  c: 'q'";
        assert_eq!(expand(text, vars(&[])).unwrap().text, text);
    }

    #[test]
    fn default_used_when_unset() {
        let out = expand("port: ${PORT:-1883}", vars(&[]));
        assert_eq!(out.unwrap().text, "port: 1883");
    }

    #[test]
    fn default_used_when_empty() {
        let out = expand("port: ${PORT:-1883}", vars(&[("PORT", "")]));
        assert_eq!(out.unwrap().text, "port: 1883");
    }

    #[test]
    fn set_value_wins_over_default() {
        let out = expand("port: ${PORT:-1883}", vars(&[("PORT", "8883")]));
        assert_eq!(out.unwrap().text, "port: 8883");
    }

    #[test]
    fn empty_value_without_default_is_empty() {
        let out = expand("a: '${EMPTY}'", vars(&[("EMPTY", "")]));
        assert_eq!(out.unwrap().text, "a: ''");
    }

    #[test]
    fn empty_default() {
        assert_eq!(expand("a: '${X:-}'", vars(&[])).unwrap().text, "a: ''");
    }

    #[test]
    fn default_is_literal() {
        let out = expand("a: ${X:-${Y:-z} $HOME :-", vars(&[("Y", "no")]));
        // The default ends at the first `}`; the rest is ordinary text.
        assert_eq!(out.unwrap().text, "a: ${Y:-z $HOME :-");
    }

    #[test]
    fn values_are_not_re_expanded() {
        let out = expand("p: ${P}", vars(&[("P", "a$${B}c${D}")]));
        assert_eq!(out.unwrap().text, "p: a$${B}c${D}");
    }

    #[test]
    fn double_dollar_is_literal_dollar() {
        let out = expand(
            "a: $$\nb: $${X}\nc: $$$${X}\nd: $$${X}\n",
            vars(&[("X", "v")]),
        );
        assert_eq!(out.unwrap().text, "a: $\nb: ${X}\nc: $${X}\nd: $v\n");
    }

    #[test]
    fn lone_dollar_is_kept() {
        let out = expand("a: $HOME costs 5$ and $", vars(&[("HOME", "/root")]));
        assert_eq!(out.unwrap().text, "a: $HOME costs 5$ and $");
    }

    #[test]
    fn unset_variable_error_position() {
        let errors = expand(
            "broker:\n  url: x\n  password: ${MQTT_PASSWORD}\n",
            vars(&[]),
        )
        .unwrap_err();
        assert_eq!(
            errors,
            vec![EnvError {
                line: 3,
                column: 13,
                message: "environment variable MQTT_PASSWORD is not set".to_owned(),
            }]
        );
        assert_eq!(
            errors[0].to_string(),
            "3:13: environment variable MQTT_PASSWORD is not set"
        );
    }

    #[test]
    fn column_counts_characters() {
        let errors = expand("é: ü ${NOPE}", vars(&[])).unwrap_err();
        assert_eq!((errors[0].line, errors[0].column), (1, 6));
    }

    #[test]
    fn all_errors_are_collected() {
        let text = "a: ${A}\nb: ${B} ${OK} ${C}\r\nc: ${1BAD}\nd: ${UNTERMINATED\ne: ${D}";
        let errors = expand(text, vars(&[("OK", "fine")])).unwrap_err();
        let got: Vec<(usize, usize, &str)> = errors
            .iter()
            .map(|e| (e.line, e.column, e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 4, "environment variable A is not set"),
                (2, 4, "environment variable B is not set"),
                (2, 15, "environment variable C is not set"),
                (
                    3,
                    4,
                    "invalid environment variable name \"1BAD\" \
                     (expected ${NAME} or ${NAME:-default})"
                ),
                (
                    4,
                    4,
                    "unterminated variable reference: `${` without a closing `}` on the same line"
                ),
                (5, 4, "environment variable D is not set"),
            ]
        );
    }

    #[test]
    fn unterminated_reference() {
        let errors = expand("a: x\nb: ${HOST\n}\n", vars(&[("HOST", "h")])).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].line, errors[0].column), (2, 4));
        assert!(errors[0].message.contains("unterminated"));
    }

    #[test]
    fn invalid_names() {
        for text in ["${}", "${:-x}", "${A-B}", "${A B}", "${9}", "${A:?err}"] {
            let errors = expand(text, vars(&[("A", "v")])).unwrap_err();
            assert_eq!(errors.len(), 1, "{text}");
            assert!(
                errors[0]
                    .message
                    .starts_with("invalid environment variable name"),
                "{text}: {}",
                errors[0].message
            );
        }
    }

    #[test]
    fn line_break_in_value_is_rejected() {
        for value in ["line1\nline2", "a\r\nb", "trailing\r"] {
            let errors = expand("  key: ${MULTI}\n", vars(&[("MULTI", value)])).unwrap_err();
            assert_eq!(
                errors,
                vec![EnvError {
                    line: 1,
                    column: 8,
                    message: "value of MULTI contains a line break".to_owned(),
                }]
            );
        }
    }

    #[test]
    fn comment_lines_are_not_expanded() {
        let text = "# uses ${UNSET} and $$\n  \t# ${ALSO_UNSET}\na: ${X} # ${X}\n";
        let out = expand(text, vars(&[("X", "v")]));
        assert_eq!(
            out.unwrap().text,
            "# uses ${UNSET} and $$\n  \t# ${ALSO_UNSET}\na: v # v\n"
        );
    }

    #[test]
    fn values_never_leak_into_messages() {
        let secret = "s3cr3t-p4ss";
        let text = "a: ${NL}\nb: ${UNSET}\nc: ${bad name}\nd: ${OPEN";
        let errors = expand(text, vars(&[("NL", "s3cr3t-p4ss\nmore")])).unwrap_err();
        assert_eq!(errors.len(), 4);
        for error in &errors {
            assert!(!error.to_string().contains(secret), "{error}");
            assert!(!error.message.contains("more"), "{error}");
        }
    }
}
