//! `/proc/self/mountinfo`: shared by cgroup discovery and storage detection.

use crate::root::{self, Missing, Notes, Root};

/// One line of `mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub(crate) major: Option<u32>,
    pub(crate) minor: Option<u32>,
    /// The root of the mount inside its filesystem (e.g. a cgroup path).
    pub(crate) root: String,
    pub(crate) mount_point: String,
    pub(crate) fs_type: String,
    pub(crate) source: String,
    pub(crate) mount_options: String,
    pub(crate) super_options: String,
}

/// Decodes the octal escapes (`\040` for a space) the kernel writes in mount paths.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = s.get(i + 1..i + 4).unwrap_or("");
            if oct.len() == 3
                && oct.bytes().all(|c| (b'0'..=b'7').contains(&c))
                && let Ok(v) = u8::from_str_radix(oct, 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `mountinfo` text; malformed lines are skipped with a warning.
pub(crate) fn parse(text: &str, notes: &mut Notes) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            notes.warn(format!(
                "mountinfo: skipping malformed line {:?}",
                root::shorten(line)
            ));
            continue;
        };
        if sep < 6 || fields.len() < sep + 3 {
            notes.warn(format!(
                "mountinfo: skipping malformed line {:?}",
                root::shorten(line)
            ));
            continue;
        }
        let (major, minor) = match fields[2].split_once(':') {
            Some((a, b)) => (a.parse().ok(), b.parse().ok()),
            None => (None, None),
        };
        out.push(Mount {
            major,
            minor,
            root: unescape(fields[3]),
            mount_point: unescape(fields[4]),
            mount_options: fields[5].to_owned(),
            fs_type: fields[sep + 1].to_owned(),
            source: unescape(fields[sep + 2]),
            super_options: fields.get(sep + 3).copied().unwrap_or("").to_owned(),
        });
    }
    out
}

/// Reads and parses `/proc/self/mountinfo` under `root`.
pub(crate) fn read(root: &Root, notes: &mut Notes) -> Vec<Mount> {
    root::read(root, "/proc/self/mountinfo", Missing::Warn, notes)
        .map(|t| parse(&t, notes))
        .unwrap_or_default()
}

/// The mount that contains the absolute path `path`: the longest matching mount point, and
/// of equal ones the last mounted (it hides the earlier).
pub(crate) fn containing<'m>(mounts: &'m [Mount], path: &str) -> Option<&'m Mount> {
    let mut best: Option<&Mount> = None;
    for m in mounts {
        let mp = m.mount_point.trim_end_matches('/');
        let inside = mp.is_empty()
            || path == mp
            || (path.starts_with(mp) && path.as_bytes().get(mp.len()) == Some(&b'/'));
        if inside && best.is_none_or(|b| b.mount_point.trim_end_matches('/').len() <= mp.len()) {
            best = Some(m);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 259:2 / / rw,relatime - ext4 /dev/nvme0n1p2 rw
30 22 8:1 / /data rw,relatime - xfs /dev/sda1 rw
31 22 8:1 /sub /data/with\\040space rw - xfs /dev/sda1 rw
40 22 0:40 / /dev/shm rw - tmpfs tmpfs rw,size=1024k
";

    #[test]
    fn parse_and_match() {
        let mut n = Notes::default();
        let m = parse(SAMPLE, &mut n);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2].mount_point, "/data/with space");
        assert_eq!(
            containing(&m, "/data/x").map(|m| m.fs_type.as_str()),
            Some("xfs")
        );
        assert_eq!(
            containing(&m, "/datax").map(|m| m.fs_type.as_str()),
            Some("ext4")
        );
        assert_eq!(
            containing(&m, "/").map(|m| m.mount_point.as_str()),
            Some("/")
        );
        assert_eq!(
            containing(&m, "/data/with space/a").map(|m| m.root.as_str()),
            Some("/sub")
        );
        assert!(n.warnings.is_empty());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let mut n = Notes::default();
        assert!(parse("garbage line\n1 2 3\n", &mut n).is_empty());
        assert_eq!(n.warnings.len(), 2);
    }
}
