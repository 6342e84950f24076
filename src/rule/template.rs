//! String templates (`{{ ... }}`) for topics, URLs, headers and bodies, rendered by
//! minijinja. Compiled once when the config loads; undefined variables are errors (never
//! an empty string in a URL); output is not HTML-escaped; rendering is bounded by fuel.

use std::sync::Arc;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};

/// Instructions one render may execute before it is stopped.
const FUEL: u64 = 100_000;
const NAME: &str = "t";

/// A compiled template. Plain text without `{{`/`{%` skips the engine entirely.
#[derive(Clone)]
pub struct Template {
    source: Arc<str>,
    env: Option<Arc<Environment<'static>>>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Template({:?})", self.source)
    }
}

impl Template {
    pub fn compile(source: &str) -> Result<Self, String> {
        let source: Arc<str> = Arc::from(source);
        if !source.contains("{{") && !source.contains("{%") && !source.contains("{#") {
            return Ok(Template { source, env: None });
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| describe(&e))?;
        Ok(Template {
            source,
            env: Some(Arc::new(env)),
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template is plain text: it renders to its source, whatever the context.
    pub fn is_plain(&self) -> bool {
        self.env.is_none()
    }

    /// Renders against any serializable context.
    pub fn render(&self, ctx: &impl serde::Serialize) -> Result<String, String> {
        let Some(env) = &self.env else {
            return Ok(self.source.to_string());
        };
        let template = env.get_template(NAME).map_err(|e| describe(&e))?;
        template
            .render(minijinja::value::Serde(ctx))
            .map_err(|e| describe(&e))
    }
}

fn describe(e: &minijinja::Error) -> String {
    match (e.detail(), e.line()) {
        (Some(detail), Some(line)) => format!("{} (line {line}): {detail}", e.kind()),
        (Some(detail), None) => format!("{}: {detail}", e.kind()),
        (None, _) => e.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_variables_without_escaping() {
        let t = Template::compile("processed/{{ topic }}/{{ vars.device }}").unwrap();
        let ctx = json!({"topic": "a/b", "vars": {"device": "<d1>"}});
        assert_eq!(t.render(&ctx).unwrap(), "processed/a/b/<d1>");
    }

    #[test]
    fn plain_text_is_returned_as_is() {
        let t = Template::compile("static/topic").unwrap();
        assert_eq!(t.render(&json!({})).unwrap(), "static/topic");
    }

    #[test]
    fn undefined_is_an_error() {
        let t = Template::compile("x/{{ vars.nope }}").unwrap();
        assert!(t.render(&json!({"vars": {}})).is_err());
    }

    #[test]
    fn syntax_errors_at_compile_time() {
        let err = Template::compile("x/{{ topic ").unwrap_err();
        assert!(err.contains("syntax"), "{err}");
    }

    #[test]
    fn runaway_loops_run_out_of_fuel() {
        let t = Template::compile(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap();
        let err = t.render(&json!({})).unwrap_err();
        assert!(err.contains("fuel"), "{err}");
    }
}
