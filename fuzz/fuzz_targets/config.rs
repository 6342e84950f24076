//! Arbitrary text as a rules file, through everything `mqbridge check` runs on one:
//! `${VAR}` expansion, the YAML parse, reading it into the config types, locating each
//! field in the text, and the plan's validation (topic filters, jq programs, templates,
//! sink settings, `embedded:`). Nothing may panic: bad input is a `ConfigErrors`, and
//! every error it reports names the file and points inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Variables resolve to a fixed value, so `${...}` reaches the parser as text does.
    let lookup = |name: &str| (name.len() % 2 == 0).then(|| "fuzz".to_string());
    if let Err(errors) = mqbridge::config::parse(text, "fuzz.yaml", lookup) {
        assert!(!errors.0.is_empty(), "a failed parse reports an error");
        // YAML's lines, as its scanner counts them: a break is LF, CR LF, a lone CR, NEL,
        // LS or PS (the last three from YAML 1.1). One more: the end of the text.
        let breaks = text
            .replace("\r\n", "\n")
            .matches(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
            .count();
        let lines = breaks + 2;
        for e in &errors.0 {
            if e.file != "fuzz.yaml" {
                continue; // a Mosquitto file the config names: its own lines
            }
            if let Some(p) = e.position {
                assert!(
                    p.line >= 1 && p.line <= lines,
                    "{e} points at line {} of {lines}",
                    p.line
                );
            }
            let _ = e.to_string();
        }
    }
});
