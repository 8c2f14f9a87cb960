//! The corrupt-input suite: every kind of bad data is skipped, counted and quarantined.

use std::io::Write;
use std::path::{Path, PathBuf};

use eg_data::stream::read_quarantine;
use eg_data::{
    Document, DocumentStream, Error, FieldPath, Format, JsonField, QuarantineReason, StreamOptions,
    TextSplit, expand_inputs,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn opts(q: &Path, max_line: usize) -> StreamOptions {
    StreamOptions {
        max_line_bytes: max_line,
        max_error_fraction: 1.0,
        min_records_for_fraction: 0,
        quarantine: Some(q.to_owned()),
    }
}

fn texts(stream: DocumentStream) -> (Vec<String>, DocumentStream) {
    let mut s = stream;
    let mut out = Vec::new();
    for r in s.by_ref() {
        match r.unwrap().doc {
            Document::Text(t) => out.push(t),
            Document::Chat(m) => out.push(format!("{} messages", m.len())),
        }
    }
    (out, s)
}

#[test]
fn corrupt_jsonl_suite_quarantines_each_case() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let mut bad = Vec::new();
    bad.extend_from_slice(b"{\"text\": \"good one\"}\n"); // line 1
    bad.extend_from_slice(b"{\"text\": \"unterminated\n"); // line 2: malformed
    bad.extend_from_slice(b"{\"text\": \"caf\xff\"}\n"); // line 3: invalid UTF-8
    bad.extend_from_slice(b"{\"other\": \"x\"}\n"); // line 4: missing field
    bad.extend_from_slice(b"{\"text\": 5}\n"); // line 5: wrong type
    let huge_at = bad.len() as u64;
    bad.extend_from_slice(b"{\"text\": \""); // line 6: 3 MB line
    bad.extend(std::iter::repeat_n(b'a', 3 << 20));
    bad.extend_from_slice(b"\"}\n");
    bad.extend_from_slice(b"[1, 2]\n"); // line 7: not an object
    bad.extend_from_slice(b"\n{\"text\": \"good two\"}\r\n"); // line 8 blank (skipped), 9 good
    write(root, "a_bad.jsonl", &bad);
    write(root, "b_empty.jsonl", b"");
    write(
        root,
        "c_binary.jsonl",
        b"\x00\x01\x02PK\x03\x04 binary junk",
    );
    write(root, "d_good.jsonl", b"{\"text\": \"good three\"}");
    let files = expand_inputs(&[format!("{}/*.jsonl", root.display())]).unwrap();
    assert_eq!(files.len(), 4);
    let q = root.join("q/quarantine.jsonl");
    let s = DocumentStream::new(
        files,
        Format::Jsonl(JsonField::Text(FieldPath::parse("text"))),
        opts(&q, 1 << 20),
    )
    .unwrap();
    let (docs, s) = texts(s);
    assert_eq!(docs, ["good one", "good two", "good three"]);
    let stats = s.stats().clone();
    assert_eq!(stats.documents, 3);
    assert_eq!(stats.bad, 8);
    let entries = read_quarantine(&q).unwrap();
    let got: Vec<(String, u64, &str)> = entries
        .iter()
        .map(|e| {
            (
                e.file.file_name().unwrap().to_string_lossy().into_owned(),
                e.line,
                e.reason.name(),
            )
        })
        .collect();
    let f = |n: &str| n.to_owned();
    assert_eq!(
        got,
        vec![
            (f("a_bad.jsonl"), 2, "malformed_json"),
            (f("a_bad.jsonl"), 3, "invalid_utf8"),
            (f("a_bad.jsonl"), 4, "missing_field"),
            (f("a_bad.jsonl"), 5, "wrong_type"),
            (f("a_bad.jsonl"), 6, "line_too_long"),
            (f("a_bad.jsonl"), 7, "malformed_json"),
            (f("b_empty.jsonl"), 0, "empty_file"),
            (f("c_binary.jsonl"), 0, "binary_file"),
        ]
    );
    assert_eq!(entries[4].byte_offset, huge_at);
    assert_eq!(
        entries[4].reason,
        QuarantineReason::LineTooLong {
            bytes: (3 << 20) + 12,
            limit: 1 << 20
        }
    );
    assert_eq!(
        entries[2].reason,
        QuarantineReason::MissingField {
            field: "text".into()
        }
    );
    assert_eq!(stats.bad_by_reason["malformed_json"], 2);
}

#[test]
fn nested_fields_and_chat_messages() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "n.jsonl",
        b"{\"a\": {\"b\": \"deep\"}}\n{\"a\": {\"c\": 1}}\n",
    );
    let q = d.path().join("q.jsonl");
    let s = DocumentStream::new(
        vec![p],
        Format::Jsonl(JsonField::Text(FieldPath::parse("a.b"))),
        opts(&q, 1024),
    )
    .unwrap();
    let (docs, _) = texts(s);
    assert_eq!(docs, ["deep"]);
    assert_eq!(
        read_quarantine(&q).unwrap()[0].reason,
        QuarantineReason::MissingField {
            field: "a.b".into()
        }
    );

    let chat = br#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
{"messages": [{"role": "user"}]}
{"messages": "nope"}
"#;
    let p = write(d.path(), "c.jsonl", chat);
    let q = d.path().join("q2.jsonl");
    let mut s = DocumentStream::new(
        vec![p],
        Format::Jsonl(JsonField::Messages(FieldPath::parse("messages"))),
        opts(&q, 1024),
    )
    .unwrap();
    let first = s.next().unwrap().unwrap();
    let Document::Chat(m) = first.doc else {
        panic!("chat expected")
    };
    assert_eq!(
        (m[1].role.as_str(), m[1].content.as_str()),
        ("assistant", "hello")
    );
    assert!(s.next().is_none());
    let names: Vec<_> = read_quarantine(&q)
        .unwrap()
        .iter()
        .map(|e| (e.line, e.reason.name()))
        .collect();
    assert_eq!(names, [(2, "wrong_type"), (3, "wrong_type")]);
}

#[test]
fn text_lines_paragraphs_and_huge_lines() {
    let d = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(d.path().join("t.txt")).unwrap();
    f.write_all(b"first para line one\nline two\n\nsecond para\n")
        .unwrap();
    // A 20 MB line is streamed through, never held.
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..20 {
        f.write_all(&chunk).unwrap();
    }
    f.write_all(b"\nlast \xc3\x28 bad utf8\n\nthe end").unwrap();
    drop(f);
    let files = expand_inputs(&[d.path().join("t.txt").display().to_string()]).unwrap();
    let q = d.path().join("q.jsonl");
    let s = DocumentStream::new(
        files.clone(),
        Format::Text(TextSplit::Paragraphs),
        opts(&q, 64 << 10),
    )
    .unwrap();
    let (docs, s) = texts(s);
    assert_eq!(
        docs,
        ["first para line one\nline two", "second para", "the end"]
    );
    assert_eq!(s.stats().bad, 2);
    let q2 = d.path().join("q2.jsonl");
    let (lines, _) = texts(
        DocumentStream::new(files, Format::Text(TextSplit::Lines), opts(&q2, 64 << 10)).unwrap(),
    );
    assert_eq!(
        lines,
        ["first para line one", "line two", "second para", "the end"]
    );
    let e = read_quarantine(&q2).unwrap();
    assert_eq!((e[0].line, e[0].reason.name()), (5, "line_too_long"));
    assert_eq!((e[1].line, e[1].reason.name()), (6, "invalid_utf8"));
}

#[test]
fn too_many_bad_records_stop_the_stream() {
    let d = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..20 {
        if i % 2 == 0 {
            text.push_str("{\"text\": \"ok\"}\n");
        } else {
            text.push_str("not json\n");
        }
    }
    let p = write(d.path(), "half.jsonl", text.as_bytes());
    let o = StreamOptions {
        max_error_fraction: 0.1,
        min_records_for_fraction: 6,
        quarantine: None,
        ..Default::default()
    };
    let s = DocumentStream::new(
        vec![p],
        Format::Jsonl(JsonField::Text(FieldPath::parse("text"))),
        o,
    )
    .unwrap();
    let results: Vec<_> = s.collect();
    let err = results.last().unwrap().as_ref().unwrap_err();
    match err {
        Error::TooManyBadRecords {
            bad, total, line, ..
        } => {
            assert_eq!((*bad, *total, *line), (3, 6, 6));
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
}
