//! The rules' compiled `decode`: a [`Decoder`] per rule. A format's name is its decoder;
//! `decode: {protobuf: ...}` reads the files it names (this is I/O, done on every load
//! like [`super::mosquitto`]'s) and compiles them: `.proto` files by protox (no `protoc`),
//! or a FileDescriptorSet, then looks the message type up. `decode: sparkplug_b` gets a
//! decoder of its own (the Sparkplug B schema is built in).
//!
//! A problem is reported at the field that names it; one inside a `.proto` file also
//! gives that file, line and column, e.g.
//! `rules[0].decode.protobuf.proto_files: sensors.proto:4:3: expected ';'`.

use std::path::Path;
#[cfg(feature = "protobuf")]
use std::path::PathBuf;

use super::plan::Errors;
use super::raw::{DecodeConfig, RuleConfig, SparkplugConfig};
use crate::rule::Decoder;

/// Each rule's decoder, in order (the default for one that has a problem), and the
/// problems; relative paths are relative to `base`, the config file's directory.
pub fn decoders(rules: &[RuleConfig], base: &Path) -> (Vec<Decoder>, Errors) {
    let mut errs = Errors::new();
    let decoders = rules
        .iter()
        .enumerate()
        .map(|(i, r)| match &r.decode {
            DecodeConfig::Named(how) => Decoder::Named(*how),
            DecodeConfig::Protobuf(p) => match message(&p.protobuf, base) {
                Ok(decoder) => decoder,
                Err((field, message)) => {
                    errs.push((format!("rules[{i}].decode.protobuf.{field}"), message));
                    Decoder::default()
                }
            },
            DecodeConfig::SparkplugB(_) => sparkplug(&SparkplugConfig::default(), i, &mut errs),
            DecodeConfig::SparkplugBWith(s) => sparkplug(&s.sparkplug_b, i, &mut errs),
        })
        .collect();
    (decoders, errs)
}

/// Rule `i`'s Sparkplug B decoder (the default one, with an error, when it cannot be had).
fn sparkplug(s: &SparkplugConfig, i: usize, errs: &mut Errors) -> Decoder {
    decoder(s).unwrap_or_else(|e| {
        errs.push((format!("rules[{i}].decode"), e));
        Decoder::default()
    })
}

#[cfg(feature = "protobuf")]
fn decoder(s: &SparkplugConfig) -> Result<Decoder, String> {
    crate::rule::Sparkplug::new(s.rebirth_on_gap)
        .map(|s| Decoder::SparkplugB(std::sync::Arc::new(s)))
}

/// Without the `protobuf` feature, Sparkplug B is an error too.
#[cfg(not(feature = "protobuf"))]
fn decoder(_: &SparkplugConfig) -> Result<Decoder, String> {
    Err("this mqbridge was built without the `protobuf` feature".into())
}

/// Without the `protobuf` feature, every Protobuf decode is an error.
#[cfg(not(feature = "protobuf"))]
fn message(_: &super::raw::ProtobufConfig, _: &Path) -> Result<Decoder, (&'static str, String)> {
    Err((
        "message",
        "this mqbridge was built without the `protobuf` feature".into(),
    ))
}

/// The message type `p` names, or (the field at fault, why).
#[cfg(feature = "protobuf")]
fn message(p: &super::raw::ProtobufConfig, base: &Path) -> Result<Decoder, (&'static str, String)> {
    use prost_reflect::DescriptorPool;

    let at = |path: &PathBuf| base.join(path);
    let pool = match (&p.descriptor_set, p.proto_files.is_empty()) {
        (Some(_), false) => {
            return Err((
                "descriptor_set",
                "give either `descriptor_set` or `proto_files`, not both".into(),
            ));
        }
        (None, true) => {
            return Err((
                "proto_files",
                "needs `.proto` files (or a `descriptor_set`)".into(),
            ));
        }
        (Some(_), true) if !p.include.is_empty() => {
            return Err(("include", "only used with `proto_files`".into()));
        }
        (Some(set), true) => {
            let path = at(set);
            let bytes = std::fs::read(&path).map_err(|e| {
                (
                    "descriptor_set",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
                (
                    "descriptor_set",
                    format!("{} is not a FileDescriptorSet: {e}", path.display()),
                )
            })?
        }
        (None, false) => {
            let files: Vec<PathBuf> = p.proto_files.iter().map(at).collect();
            // protox would call a missing file one "not in any include path".
            if let Some((path, e)) = files
                .iter()
                .find_map(|f| std::fs::metadata(f).err().map(|e| (f, e)))
            {
                return Err((
                    "proto_files",
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
            let include: Vec<PathBuf> = if p.include.is_empty() {
                let mut dirs: Vec<PathBuf> = files
                    .iter()
                    .map(|f| f.parent().unwrap_or(Path::new("")).to_path_buf())
                    .collect();
                dirs.dedup();
                dirs
            } else {
                p.include.iter().map(at).collect()
            };
            let compiled = protox::Compiler::new(&include).and_then(|mut c| {
                c.include_imports(true).open_files(&files)?;
                Ok(c.descriptor_pool())
            });
            compiled.map_err(|e| ("proto_files", proto_error(&e, &include)))?
        }
    };
    pool.get_message_by_name(&p.message)
        .map(Decoder::Protobuf)
        .ok_or_else(|| ("message", unknown_message(&p.message, &pool)))
}

/// A protox error, prefixed with the `.proto` file (as found in `include`), line and
/// column it is about when it has them.
#[cfg(feature = "protobuf")]
fn proto_error(e: &protox::Error, include: &[PathBuf]) -> String {
    use miette::Diagnostic;

    let Some(name) = e.file() else {
        return e.to_string();
    };
    let file = include
        .iter()
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| name.into());
    let position = e
        .labels()
        .and_then(|mut labels| labels.next())
        .zip(e.source_code())
        .and_then(|(label, source)| source.read_span(label.inner(), 0, 0).ok())
        .map(|span| format!(":{}:{}", span.line() + 1, span.column() + 1));
    format!("{}{}: {e}", file.display(), position.unwrap_or_default())
}

/// Which message types there are, when the one named is not.
#[cfg(feature = "protobuf")]
fn unknown_message(name: &str, pool: &prost_reflect::DescriptorPool) -> String {
    let known: Vec<String> = pool
        .all_messages()
        .filter(|m| !m.is_map_entry() && !m.full_name().starts_with("google.protobuf."))
        .map(|m| m.full_name().to_string())
        .collect();
    match known.len() {
        0 => format!("no message type {name:?}: the schema defines none"),
        n if n <= 10 => format!("no message type {name:?}; there are: {}", known.join(", ")),
        n => format!(
            "no message type {name:?}; there are {n}, e.g. {}",
            known[..10].join(", ")
        ),
    }
}

#[cfg(all(test, feature = "protobuf"))]
mod tests {
    use std::path::Path;

    use crate::config::{Plan, parse};

    const SCHEMA: &str =
        "syntax = \"proto3\";\npackage sensors;\nmessage Reading {\n  double temp = 1;\n}\n";

    /// A config whose only rule decodes with `decode`, loaded as if it were `dir/rules.yaml`.
    fn load(dir: &Path, decode: &str) -> Result<Plan, Vec<String>> {
        let text = format!(
            "sinks: {{ out: {{ type: file, path: out.jsonl }} }}\n\
             rules:\n  - name: r\n    from: a/#\n    decode: {decode}\n    to: out\n"
        );
        let file = dir.join("rules.yaml");
        parse(&text, &file.display().to_string(), |_| None)
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn proto_files_relative_to_the_config_compile_at_load() {
        let dir = dir_with(&[("reading.proto", SCHEMA)]);
        let plan = load(
            dir.path(),
            "{ protobuf: { proto_files: [reading.proto], message: sensors.Reading } }",
        )
        .unwrap();
        assert_eq!(plan.rules[0].decode.to_string(), "protobuf sensors.Reading");
        // The names still read as before.
        let plan = load(dir.path(), "msgpack").unwrap();
        assert_eq!(plan.rules[0].decode.to_string(), "msgpack");
    }

    #[test]
    fn imports_are_found_in_include() {
        let dir = dir_with(&[("reading.proto", SCHEMA)]);
        std::fs::create_dir(dir.path().join("app")).unwrap();
        std::fs::write(
            dir.path().join("app/batch.proto"),
            "syntax = \"proto3\";\npackage app;\nimport \"reading.proto\";\n\
             message Batch { repeated sensors.Reading readings = 1; }\n",
        )
        .unwrap();
        let plan = load(
            dir.path(),
            "{ protobuf: { proto_files: [app/batch.proto], include: [., app], message: app.Batch } }",
        )
        .unwrap();
        assert_eq!(plan.rules[0].decode.to_string(), "protobuf app.Batch");
    }

    #[test]
    fn a_descriptor_set_serves_as_well() {
        let dir = dir_with(&[("reading.proto", SCHEMA)]);
        let set = protox::compile([dir.path().join("reading.proto")], [dir.path()]).unwrap();
        let set = prost_reflect::prost::Message::encode_to_vec(&set);
        std::fs::write(dir.path().join("reading.pb"), set).unwrap();
        let plan = load(
            dir.path(),
            "{ protobuf: { descriptor_set: reading.pb, message: sensors.Reading } }",
        )
        .unwrap();
        assert_eq!(plan.rules[0].decode.to_string(), "protobuf sensors.Reading");
    }

    #[test]
    fn a_proto_that_does_not_compile_is_located_in_both_files() {
        let dir = dir_with(&[(
            "reading.proto",
            "syntax = \"proto3\";\npackage sensors;\nmessage Reading {\n  double temp = 1\n}\n",
        )]);
        let errs = load(
            dir.path(),
            "{ protobuf: { proto_files: [reading.proto], message: sensors.Reading } }",
        )
        .unwrap_err();
        let proto = dir.path().join("reading.proto");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(&format!("{}:5:", dir.path().join("rules.yaml").display()))
                && errs[0].contains(&format!(
                    "rules[0].decode.protobuf.proto_files: {}:5:1: ",
                    proto.display()
                )),
            "{errs:?}"
        );
        // A name that is not defined: an error of the schema, not of its syntax.
        std::fs::write(
            &proto,
            "syntax = \"proto3\";\npackage sensors;\nmessage Reading {\n  Unit unit = 1;\n}\n",
        )
        .unwrap();
        let errs = load(
            dir.path(),
            "{ protobuf: { proto_files: [reading.proto], message: sensors.Reading } }",
        )
        .unwrap_err();
        assert!(
            errs[0].contains(&format!(
                "{}:4:3: name 'Unit' is not defined",
                proto.display()
            )),
            "{errs:?}"
        );
    }

    #[test]
    fn a_missing_message_type_or_file_is_an_error_at_its_field() {
        let dir = dir_with(&[("reading.proto", SCHEMA)]);
        let errs = load(
            dir.path(),
            "{ protobuf: { proto_files: [reading.proto], message: sensors.Nope } }",
        )
        .unwrap_err();
        assert!(
            errs[0].ends_with(
                "rules[0].decode.protobuf.message: no message type \"sensors.Nope\"; there are: sensors.Reading"
            ),
            "{errs:?}"
        );
        let errs = load(
            dir.path(),
            "{ protobuf: { proto_files: [missing.proto], message: sensors.Reading } }",
        )
        .unwrap_err();
        let missing = dir.path().join("missing.proto");
        assert!(
            errs[0].contains(&format!(
                "rules[0].decode.protobuf.proto_files: cannot read {}: ",
                missing.display()
            )),
            "{errs:?}"
        );
        let errs = load(dir.path(), "{ protobuf: { message: sensors.Reading } }").unwrap_err();
        assert!(
            errs[0].ends_with(
                "rules[0].decode.protobuf.proto_files: needs `.proto` files (or a `descriptor_set`)"
            ),
            "{errs:?}"
        );
        let errs = load(dir.path(), "{ protobuf: { proto_files: [reading.proto] } }").unwrap_err();
        assert!(errs[0].contains("missing field `message`"), "{errs:?}");
        let errs = load(
            dir.path(),
            "{ protobuf: { proto_files: [reading.proto], message: x }, json: 1 }",
        )
        .unwrap_err();
        assert!(errs[0].contains("unknown field `json`"), "{errs:?}");
        let errs = load(dir.path(), "jsn").unwrap_err();
        assert!(
            errs[0].contains("rules[0].decode: unknown variant `jsn`"),
            "{errs:?}"
        );
    }

    #[test]
    fn sparkplug_b_is_a_name_or_a_map_of_its_settings() {
        let dir = tempfile::tempdir().unwrap();
        for (decode, shown) in [
            ("sparkplug_b", "sparkplug_b"),
            ("{ sparkplug_b: {} }", "sparkplug_b"),
            (
                "{ sparkplug_b: { rebirth_on_gap: true } }",
                "sparkplug_b (rebirth on gap)",
            ),
        ] {
            let plan = load(dir.path(), decode).unwrap();
            assert_eq!(plan.rules[0].decode.to_string(), shown);
        }
        let errs = load(dir.path(), "{ sparkplug_b: { rebirth_on_gaps: true } }").unwrap_err();
        assert!(
            errs[0].contains(
                "rules[0].decode.sparkplug_b.rebirth_on_gaps: unknown field `rebirth_on_gaps`"
            ),
            "{errs:?}"
        );
        let errs = load(dir.path(), "{ sparkplug_b: { rebirth_on_gap: 3 } }").unwrap_err();
        assert!(
            errs[0].contains("rules[0].decode.sparkplug_b.rebirth_on_gap: invalid type"),
            "{errs:?}"
        );
        let errs = load(dir.path(), "{ sparkplug: {} }").unwrap_err();
        assert!(
            errs[0].contains("unknown field `sparkplug`, expected `protobuf` or `sparkplug_b`"),
            "{errs:?}"
        );
        let errs = load(dir.path(), "sparkplug").unwrap_err();
        assert!(
            errs[0].contains("unknown variant `sparkplug`") && errs[0].contains("`sparkplug_b`"),
            "{errs:?}"
        );
    }
}
