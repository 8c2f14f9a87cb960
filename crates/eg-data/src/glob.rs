//! Input expansion: files, directories (recursively) and glob patterns (`*`, `?`, `**`).

use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// `*` matches any run of characters, `?` one character (within one path component).
fn wildmatch(pat: &[char], s: &[char]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pat.len() && (pat[p] == '?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == '*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == '*')
}

/// Match path components against pattern components; `**` matches zero or more components.
fn match_components(pat: &[String], path: &[String]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|k| match_components(rest, &path[k..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((p, prest)) => {
                let pc: Vec<char> = first.chars().collect();
                let sc: Vec<char> = p.chars().collect();
                wildmatch(&pc, &sc) && match_components(rest, prest)
            }
            None => false,
        },
    }
}

/// Every file under `dir`, recursively, in sorted order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect::<Result<_>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn components(p: &Path) -> Vec<String> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

/// Expand inputs into a sorted, de-duplicated list of files.
///
/// A file stands for itself, a directory for every file below it, and a pattern with `*`,
/// `?` or `**` for the files it matches. An input that matches nothing is an error
/// ([`Error::NoInput`]): a typo must not silently train on less data.
pub fn expand_inputs<S: AsRef<str>>(inputs: &[S]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let input = input.as_ref();
        let before = out.len();
        if has_wildcard(input) {
            let path = Path::new(input);
            let mut base = PathBuf::new();
            let mut rest = Vec::new();
            let mut in_pattern = false;
            for c in path.components() {
                let s = c.as_os_str().to_string_lossy();
                if !in_pattern && !has_wildcard(&s) {
                    base.push(c.as_os_str());
                } else {
                    in_pattern = true;
                    rest.push(s.into_owned());
                }
            }
            let root = if base.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                base.clone()
            };
            if root.is_dir() {
                let mut files = Vec::new();
                walk(&root, &mut files)?;
                for f in files {
                    let rel = f.strip_prefix(&root).unwrap_or(&f);
                    if match_components(&rest, &components(rel)) {
                        out.push(f);
                    }
                }
            }
        } else {
            let p = PathBuf::from(input);
            if p.is_dir() {
                walk(&p, &mut out)?;
            } else if p.is_file() {
                out.push(p);
            }
        }
        if out.len() == before {
            return Err(Error::NoInput {
                pattern: input.to_owned(),
            });
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let m = |p: &str, s: &str| {
            wildmatch(
                &p.chars().collect::<Vec<_>>(),
                &s.chars().collect::<Vec<_>>(),
            )
        };
        assert!(m("*.txt", "a.txt"));
        assert!(!m("*.txt", "a.txt.gz"));
        assert!(m("a?c*", "abcdef"));
        assert!(m("*", ""));
        assert!(!m("?", ""));
    }

    #[test]
    fn expand_dirs_and_globs() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("x/y")).unwrap();
        for f in ["a.txt", "b.jsonl", "x/c.txt", "x/y/d.txt"] {
            std::fs::write(root.join(f), "hi").unwrap();
        }
        let r = root.display();
        assert_eq!(
            expand_inputs(&[format!("{r}/*.txt")]).unwrap(),
            vec![root.join("a.txt")]
        );
        assert_eq!(expand_inputs(&[format!("{r}/**/*.txt")]).unwrap().len(), 3);
        assert_eq!(expand_inputs(&[format!("{r}/x")]).unwrap().len(), 2);
        assert!(matches!(
            expand_inputs(&[format!("{r}/*.csv")]),
            Err(Error::NoInput { .. })
        ));
    }
}
