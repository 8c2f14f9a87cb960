//! Hostile and malformed input: typed errors, never a panic.

use eg_config::{Error, Sources};
use proptest::prelude::*;

use crate::Dir;

fn load_bytes(name: &str, bytes: &[u8]) -> Result<eg_config::Config, Error> {
    let dir = Dir::new();
    let p = dir.write_bytes(name, bytes);
    Sources::new().file(p).load()
}

#[test]
fn empty_files_are_valid_in_every_format() {
    for name in ["a.toml", "a.yaml", "a.json"] {
        for body in ["", "\n\n", "   "] {
            load_bytes(name, body.as_bytes()).unwrap_or_else(|e| panic!("{name} {body:?}: {e}"));
        }
    }
    load_bytes("c.yaml", b"# only a comment\n").expect("comment-only yaml");
    load_bytes("c.toml", b"# only a comment\n").expect("comment-only toml");
}

#[test]
fn syntax_errors_name_file_and_line() {
    for (name, body, line) in [
        ("s.toml", "[train]\nmax_steps = = 3\n", 2),
        ("s.yaml", "train:\n  max_steps: 3\n bad: [\n", 3),
        ("s.json", "{\n\"train\": {\n\"max_steps\": 3,,\n}}", 3),
    ] {
        let err = load_bytes(name, body.as_bytes()).unwrap_err();
        match &err {
            Error::Syntax { path, line: l, .. } => {
                assert!(path.ends_with(name), "{err}");
                assert_eq!(*l, Some(line), "{name}: {err}");
            }
            other => panic!("{name}: expected a syntax error, got {other:?}"),
        }
        assert!(err.to_string().contains("syntax error"), "{err}");
    }
}

#[test]
fn utf16_file_is_an_encoding_error() {
    let mut bytes = vec![0xFF, 0xFE];
    for u in "[train]\nmax_steps = 3\n".encode_utf16() {
        bytes.extend_from_slice(&u.to_le_bytes());
    }
    let err = load_bytes("w.toml", &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Encoding {
                offset: 0,
                line: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("not UTF-8 text"), "{err}");
}

#[test]
fn latin1_file_reports_offset_and_line() {
    let err = load_bytes("l.toml", b"[run]\nname = \"caf\xe9\"\n").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Encoding {
                offset: 17,
                line: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn binary_junk_is_rejected() {
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let err = load_bytes("j.toml", &junk).unwrap_err();
    assert!(
        matches!(err, Error::Encoding { .. } | Error::Syntax { .. }),
        "{err:?}"
    );
    let err = load_bytes("n.json", b"{\"run\": {}}\0\0\0").unwrap_err();
    assert!(err.to_string().contains("NUL byte"), "{err}");
}

#[test]
fn deep_nesting_is_rejected_without_overflow() {
    let deep = format!("a = {}1{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(
        load_bytes("d.toml", deep.as_bytes()).unwrap_err(),
        Error::Syntax { .. }
    ));
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(
        load_bytes("d.json", deep.as_bytes()).unwrap_err(),
        Error::Syntax { .. }
    ));
    let deep = format!("a: {}1{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(matches!(
        load_bytes("d.yaml", deep.as_bytes()).unwrap_err(),
        Error::Syntax { .. }
    ));
    // Indentation-nested YAML mappings.
    let mut y = String::new();
    for i in 0..2_000 {
        y.push_str(&" ".repeat(i));
        y.push_str("k:\n");
    }
    let err = load_bytes("i.yaml", y.as_bytes()).unwrap_err();
    assert!(
        matches!(err, Error::Syntax { .. } | Error::UnknownKey { .. }),
        "{err:?}"
    );
}

#[test]
fn top_level_must_be_a_table() {
    for (name, body) in [
        ("t.json", "[1, 2]"),
        ("t.yaml", "- a\n- b\n"),
        ("u.json", "42"),
        ("u.yaml", "just text"),
    ] {
        let err = load_bytes(name, body.as_bytes()).unwrap_err();
        assert!(matches!(err, Error::NotATable { .. }), "{name}: {err:?}");
    }
}

#[test]
fn unsupported_extension() {
    let err = load_bytes("run.ini", b"[train]").unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedFormat { extension, .. } if extension == "ini"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(".toml, .yaml, .yml, .json"),
        "{err}"
    );
}

#[test]
fn missing_file() {
    let err = Sources::new()
        .file("/nonexistent/eg/run.toml")
        .load()
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/eg/run.toml"),
        "{err}"
    );
}

#[test]
fn oversized_file() {
    let big = format!("# {}\n", "x".repeat(5 << 20));
    let err = load_bytes("big.toml", big.as_bytes()).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
}

#[test]
fn huge_and_special_numbers() {
    // An integer beyond 64 bits is a type error naming the number, not a wrap-around.
    let err = load_bytes("h.toml", b"[train]\nmax_steps = 99999999999999999999999\n").unwrap_err();
    assert!(matches!(err, Error::WrongType { .. }), "{err:?}");
    assert!(err.to_string().contains("99999999999999999999999"), "{err}");
    // JSON numbers beyond f64 are rejected by the parser.
    let err = load_bytes("h.json", b"{\"train\": {\"optimizer\": {\"lr\": 1e400}}}").unwrap_err();
    assert!(matches!(err, Error::Syntax { .. }), "{err:?}");
    let err = load_bytes("h.toml", b"[train.optimizer]\nlr = -inf\n").unwrap_err();
    assert!(err.to_string().contains("-inf"), "{err}");
}

#[test]
fn extends_cycle_is_reported() {
    let dir = Dir::new();
    dir.write("a.toml", "extends = \"b.toml\"\n");
    dir.write("b.toml", "extends = \"a.toml\"\n");
    let err = Sources::new()
        .file(dir.path().join("a.toml"))
        .load()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Extends {
                problem: "forms a cycle",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("a.toml -> "), "{err}");
}

#[test]
fn extends_must_name_files() {
    let dir = Dir::new();
    let p = dir.write("a.toml", "\nextends = 3\n");
    let err = Sources::new().file(&p).load().unwrap_err();
    crate::assert_error(
        &err,
        "extends",
        &crate::at_file(&p, 2),
        &["a file name or a list of file names"],
    );
}

#[test]
fn extends_missing_base() {
    let dir = Dir::new();
    let p = dir.write("a.yaml", "extends: base.yaml\n");
    let err = Sources::new().file(&p).load().unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("base.yaml"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary bytes in any format: an error or a config, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), ext in 0..3usize) {
        let name = ["f.toml", "f.yaml", "f.json"][ext];
        let _ = load_bytes(name, &bytes);
    }

    /// Arbitrary text made of config-like tokens: an error or a config, never a panic.
    #[test]
    fn config_like_text_never_panics(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("[train]\n"), Just("max_steps = "), Just("1e999"), Just("nan"), Just("\"x\""),
                Just("[[a]]\n"), Just("{"), Just("}"), Just(":"), Just("- "), Just("\n"), Just("  "),
                Just("train:"), Just("lr: "), Just("18446744073709551616"), Just("[train.optimizer]\n"),
                Just("extends = \"f.toml\"\n"), Just("\u{feff}"), Just("&a [*a]"),
            ],
            0..40,
        ),
        ext in 0..3usize,
    ) {
        let name = ["f.toml", "f.yaml", "f.json"][ext];
        let _ = load_bytes(name, parts.concat().as_bytes());
    }

    /// Arbitrary `--set` and environment input: never a panic.
    #[test]
    fn arbitrary_overrides_never_panic(key in "\\PC{0,30}", value in "\\PC{0,30}") {
        let _ = Sources::new().set(format!("{key}={value}")).load();
        let _ = Sources::new().env_vars([(format!("EG_{key}__X"), value)]).load();
    }
}
