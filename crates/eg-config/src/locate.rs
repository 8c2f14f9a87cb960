//! Finds the line of a key path in a TOML, YAML or JSON file, for error messages.
//!
//! figment tracks which file a value came from but not the line. This scanner looks for the
//! components of the path in order (`[train.optimizer]` then `lr =`, or `train:` then `lr:`, or
//! `"train": {` then `"lr":`), skipping comment lines. It is a best effort: when a component is
//! not found the line is reported as unknown rather than guessed.

/// The 1-based line at which `path` is set in `text`, if it can be found.
pub(crate) fn find_line(text: &str, path: &[&str]) -> Option<usize> {
    if path.is_empty() {
        return None;
    }
    let mut pos = 0;
    let mut last = None;
    for comp in path {
        let at = find_key(text, comp, pos)?;
        last = Some(at);
        pos = at + comp.len();
    }
    last.map(|at| line_of(text, at))
}

/// 1-based line of byte offset `at`.
pub(crate) fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn find_key(text: &str, key: &str, from: usize) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    let bytes = text.as_bytes();
    let mut start = from;
    while start <= text.len() {
        let rel = text.get(start..)?.find(key)?;
        let at = start + rel;
        let end = at + key.len();
        if is_key_start(bytes, at) && is_key_end(bytes, end) && !in_comment(bytes, at) {
            return Some(at);
        }
        start = at + 1;
        while start < text.len() && !text.is_char_boundary(start) {
            start += 1;
        }
    }
    None
}

fn is_key_start(b: &[u8], at: usize) -> bool {
    at == 0
        || matches!(
            b[at - 1],
            b' ' | b'\t' | b'\n' | b'\r' | b'.' | b'[' | b'{' | b',' | b'"' | b'\''
        )
}

fn is_key_end(b: &[u8], mut end: usize) -> bool {
    if end < b.len() && matches!(b[end], b'"' | b'\'') {
        end += 1;
    }
    while end < b.len() && matches!(b[end], b' ' | b'\t') {
        end += 1;
    }
    end < b.len() && matches!(b[end], b'=' | b':' | b'.' | b']')
}

fn in_comment(b: &[u8], at: usize) -> bool {
    let line_start = b[..at]
        .iter()
        .rposition(|c| *c == b'\n')
        .map_or(0, |p| p + 1);
    b[line_start..at].contains(&b'#')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_tables_and_dotted_keys() {
        let t = "# lr = 1\n[run]\nseed = 1\n\n[train.optimizer]\nkind = \"adamw\"\nlr = 3e-4\n";
        assert_eq!(find_line(t, &["train", "optimizer", "lr"]), Some(7));
        assert_eq!(find_line(t, &["run", "seed"]), Some(3));
        let t = "[train]\noptimizer.lr = 3\nmax_steps = 2\n";
        assert_eq!(find_line(t, &["train", "optimizer", "lr"]), Some(2));
        assert_eq!(find_line(t, &["train", "max_steps"]), Some(3));
        assert_eq!(find_line(t, &["train", "nothing"]), None);
    }

    #[test]
    fn yaml_and_json() {
        let y = "run:\n  seed: 3\ntrain:\n  optimizer:\n    lr: 0.1\n";
        assert_eq!(find_line(y, &["train", "optimizer", "lr"]), Some(5));
        let j = "{\n \"train\": {\n  \"optimizer\": {\"lr\": 1}\n }\n}";
        assert_eq!(find_line(j, &["train", "optimizer", "lr"]), Some(3));
    }

    #[test]
    fn prefixes_are_not_keys() {
        let t = "[train]\nmax_steps_x = 1\nmax_steps = 2\n";
        assert_eq!(find_line(t, &["train", "max_steps"]), Some(3));
    }
}
