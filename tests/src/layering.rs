//! The dependency rule of the workspace, checked against `cargo metadata`.
//!
//! Elastic-Guardian is layered: a crate may depend only on crates *below* it in
//! [`LAYERS`]. This module reads the JSON that `cargo metadata --format-version 1
//! --no-deps` prints and reports every edge that breaks the rule, so the rule is
//! checked by a test instead of by review (rust-analyzer's `tidy` does the same).
//!
//! # The rule
//!
//! * **Normal and build dependencies** of a layered crate may name only layered
//!   crates that come earlier in [`LAYERS`].
//! * **Dev-dependencies** follow the same rule. Cargo would accept a lower crate
//!   dev-depending on a higher one, but then the lower crate's tests exercise the
//!   higher crate's code and the layers stop being testable on their own. The one
//!   exception is [`DEV_DEP_EXCEPTIONS`]: the facade may dev-depend on the `eg`
//!   command line (the adjacent top layer), e.g. for end-to-end doc examples.
//! * **No layered crate depends on a support crate** ([`SUPPORT_CRATES`]:
//!   workspace-wide tests, benchmarks and `xtask`), in any kind of dependency.
//! * **`xtask` depends on no workspace crate**, so `cargo xtask` stays quick to
//!   build and keeps working while a library crate is broken.
//! * **Every workspace member is known**: a new crate must be added to
//!   [`LAYERS`] (or [`SUPPORT_CRATES`]) before it can be used, and every name in
//!   [`LAYERS`] must be a workspace member, so a rename cannot silently switch the
//!   check off.
//!
//! The order is written in exactly one place, [`LAYERS`]; `ARCHITECTURE.md`
//! repeats it as the line [`order_line()`] and a test keeps the two equal.
//!
//! # Example
//!
//! ```
//! use eg_tests::layering::check;
//!
//! // eg-config (the bottom layer) must not depend on eg-data.
//! let metadata = r#"{"packages": [
//!     {"name": "eg-config", "dependencies": [{"name": "eg-data", "kind": null, "path": "/w/crates/eg-data"}]},
//!     {"name": "eg-data", "dependencies": []}
//! ]}"#;
//! let violations = check(metadata, &["eg-config", "eg-data"], &[])?;
//! assert_eq!(violations.len(), 1);
//! assert!(violations[0].to_string().contains("eg-config -> eg-data"));
//! # Ok::<(), eg_tests::layering::LayeringError>(())
//! ```

use std::fmt;

use serde_json::Value;

/// The layers, bottom to top. A crate may depend only on crates listed before it.
///
/// `ARCHITECTURE.md` shows this list joined with ` → ` (see [`order_line`]).
pub const LAYERS: &[&str] = &[
    "eg-config",
    "eg-hardware",
    "eg-memory",
    "eg-data",
    "eg-model",
    "eg-kernel",
    "eg-dist",
    "eg-monitor",
    "eg-export",
    "elastic-guardian",
    "eg-cli",
];

/// Workspace members outside the layers: they may depend on any layered crate,
/// but no layered crate may depend on them.
pub const SUPPORT_CRATES: &[&str] = &["eg-tests", "eg-benches", "xtask"];

/// The support crate that must not depend on any workspace crate at all.
pub const STANDALONE_CRATE: &str = "xtask";

/// Dev-dependency edges `(from, to)` allowed although `to` is above `from`.
pub const DEV_DEP_EXCEPTIONS: &[(&str, &str)] = &[("elastic-guardian", "eg-cli")];

/// The order as one line, exactly as `ARCHITECTURE.md` must show it.
pub fn order_line() -> String {
    LAYERS.join(" → ")
}

/// The kind of a dependency edge, as `cargo metadata` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepKind {
    /// A `[dependencies]` entry.
    Normal,
    /// A `[build-dependencies]` entry.
    Build,
    /// A `[dev-dependencies]` entry.
    Dev,
}

impl fmt::Display for DepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "dependency",
            Self::Build => "build-dependency",
            Self::Dev => "dev-dependency",
        })
    }
}

/// One dependency edge between two workspace members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// The depending package.
    pub from: String,
    /// The package depended on.
    pub to: String,
    /// How `from` depends on `to`.
    pub kind: DepKind,
}

impl fmt::Display for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.from, self.to, self.kind)
    }
}

/// A break of the dependency rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A layered crate depends on a crate at the same level or above it.
    Upward {
        /// The offending edge.
        edge: Edge,
        /// Position of `edge.from` in [`LAYERS`].
        from_layer: usize,
        /// Position of `edge.to` in [`LAYERS`].
        to_layer: usize,
    },
    /// A layered crate depends on a support crate (tests, benches, xtask).
    OnSupportCrate {
        /// The offending edge.
        edge: Edge,
    },
    /// `xtask` depends on a workspace crate.
    StandaloneDepends {
        /// The offending edge.
        edge: Edge,
    },
    /// A workspace member is neither in [`LAYERS`] nor in [`SUPPORT_CRATES`].
    UnknownMember {
        /// The package name.
        name: String,
    },
    /// A name in [`LAYERS`] is not a workspace member.
    MissingLayer {
        /// The package name.
        name: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Upward {
                edge,
                from_layer,
                to_layer,
            } => write!(
                f,
                "{edge}: layer {from_layer} ({}) may depend only on layers below it, \
                 but {} is layer {to_layer}",
                edge.from, edge.to
            ),
            Self::OnSupportCrate { edge } => write!(
                f,
                "{edge}: a layered crate may not depend on the support crate {}",
                edge.to
            ),
            Self::StandaloneDepends { edge } => write!(
                f,
                "{edge}: {} must not depend on any workspace crate",
                edge.from
            ),
            Self::UnknownMember { name } => write!(
                f,
                "workspace member {name} is not in the layer order; add it to \
                 eg_tests::layering::LAYERS (and ARCHITECTURE.md) or SUPPORT_CRATES"
            ),
            Self::MissingLayer { name } => write!(
                f,
                "{name} is in the layer order but is not a workspace member"
            ),
        }
    }
}

/// The metadata could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayeringError {
    /// The text is not JSON.
    #[error("cargo metadata output is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON lacks a field the check needs.
    #[error("cargo metadata output has no {field} {context}")]
    MissingField {
        /// The field that was looked for.
        field: &'static str,
        /// Where it was looked for.
        context: String,
    },
    /// A dependency has a `kind` this check does not know.
    #[error("dependency {from} -> {to} has unknown kind {kind:?}")]
    UnknownKind {
        /// The depending package.
        from: String,
        /// The package depended on.
        to: String,
        /// The kind as found.
        kind: String,
    },
}

/// Extracts the workspace members and the edges between them from
/// `cargo metadata --format-version 1 --no-deps` output.
///
/// Only edges between workspace members are returned; dependencies on
/// registry crates are ignored.
pub fn workspace_edges(metadata_json: &str) -> Result<(Vec<String>, Vec<Edge>), LayeringError> {
    let root: Value = serde_json::from_str(metadata_json)?;
    let packages = root
        .get("packages")
        .and_then(Value::as_array)
        .ok_or_else(|| LayeringError::MissingField {
            field: "packages",
            context: "at the top level".to_owned(),
        })?;
    let mut names = Vec::with_capacity(packages.len());
    for package in packages {
        let name = package.get("name").and_then(Value::as_str).ok_or_else(|| {
            LayeringError::MissingField {
                field: "name",
                context: "in a package".to_owned(),
            }
        })?;
        names.push(name.to_owned());
    }
    let mut edges = Vec::new();
    for (package, from) in packages.iter().zip(&names) {
        let deps = package
            .get("dependencies")
            .and_then(Value::as_array)
            .ok_or_else(|| LayeringError::MissingField {
                field: "dependencies",
                context: format!("in package {from}"),
            })?;
        for dep in deps {
            let to = dep.get("name").and_then(Value::as_str).ok_or_else(|| {
                LayeringError::MissingField {
                    field: "name",
                    context: format!("in a dependency of {from}"),
                }
            })?;
            if !names.iter().any(|n| n == to) {
                continue;
            }
            let kind = match dep.get("kind") {
                None | Some(Value::Null) => DepKind::Normal,
                Some(Value::String(k)) if k == "normal" => DepKind::Normal,
                Some(Value::String(k)) if k == "build" => DepKind::Build,
                Some(Value::String(k)) if k == "dev" => DepKind::Dev,
                Some(other) => {
                    return Err(LayeringError::UnknownKind {
                        from: from.clone(),
                        to: to.to_owned(),
                        kind: other.to_string(),
                    });
                }
            };
            edges.push(Edge {
                from: from.clone(),
                to: to.to_owned(),
                kind,
            });
        }
    }
    Ok((names, edges))
}

/// Checks `cargo metadata` output against a layer order.
///
/// `layers` is bottom to top; `support` lists the members outside the layers
/// (pass [`LAYERS`] and [`SUPPORT_CRATES`] for the real workspace). Returns every
/// violation found, in a stable order; an empty list means the rule holds.
pub fn check(
    metadata_json: &str,
    layers: &[&str],
    support: &[&str],
) -> Result<Vec<Violation>, LayeringError> {
    let (members, edges) = workspace_edges(metadata_json)?;
    let layer_of = |name: &str| layers.iter().position(|l| *l == name);
    let mut violations = Vec::new();

    for name in &members {
        if layer_of(name).is_none() && !support.contains(&name.as_str()) {
            violations.push(Violation::UnknownMember { name: name.clone() });
        }
    }
    for name in layers {
        if !members.iter().any(|m| m == name) {
            violations.push(Violation::MissingLayer {
                name: (*name).to_owned(),
            });
        }
    }
    for edge in edges {
        if edge.from == STANDALONE_CRATE {
            violations.push(Violation::StandaloneDepends { edge });
            continue;
        }
        let Some(from_layer) = layer_of(&edge.from) else {
            // Support crates may use any layered crate.
            continue;
        };
        let Some(to_layer) = layer_of(&edge.to) else {
            if support.contains(&edge.to.as_str()) {
                violations.push(Violation::OnSupportCrate { edge });
            }
            // An unknown member is reported above.
            continue;
        };
        if to_layer < from_layer {
            continue;
        }
        let excepted = edge.kind == DepKind::Dev
            && DEV_DEP_EXCEPTIONS
                .iter()
                .any(|(f, t)| *f == edge.from && *t == edge.to);
        if !excepted {
            violations.push(Violation::Upward {
                edge,
                from_layer,
                to_layer,
            });
        }
    }
    Ok(violations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(name: &str, kind: &str) -> String {
        let kind = if kind == "normal" {
            "null".to_owned()
        } else {
            format!("\"{kind}\"")
        };
        format!(r#"{{"name": "{name}", "kind": {kind}, "path": "/w/{name}", "source": null}}"#)
    }

    /// Synthetic `cargo metadata` output: `(package, [(dependency, kind)])`.
    fn metadata(packages: &[(&str, &[(&str, &str)])]) -> String {
        let packages: Vec<String> = packages
            .iter()
            .map(|(name, deps)| {
                let mut deps: Vec<String> = deps.iter().map(|(d, k)| dep(d, k)).collect();
                // A registry dependency, which the check must ignore.
                deps.push(
                    r#"{"name": "serde", "kind": null, "source": "registry+https://github.com/rust-lang/crates.io-index"}"#
                        .to_owned(),
                );
                format!(r#"{{"name": "{name}", "dependencies": [{}]}}"#, deps.join(","))
            })
            .collect();
        format!(
            r#"{{"packages": [{}], "workspace_members": [], "version": 1}}"#,
            packages.join(",")
        )
    }

    /// The real layers, every one depending on all below it, plus the support crates.
    fn healthy() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
        let mut packages: Vec<(&str, Vec<(&str, &str)>)> = LAYERS
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, LAYERS[..i].iter().map(|d| (*d, "normal")).collect()))
            .collect();
        packages.push(("eg-tests", vec![("elastic-guardian", "normal")]));
        packages.push(("eg-benches", vec![("eg-model", "dev")]));
        packages.push(("xtask", vec![]));
        packages
    }

    fn run(packages: &[(&'static str, Vec<(&'static str, &'static str)>)]) -> Vec<Violation> {
        let borrowed: Vec<(&str, &[(&str, &str)])> =
            packages.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        match check(&metadata(&borrowed), LAYERS, SUPPORT_CRATES) {
            Ok(v) => v,
            Err(e) => panic!("synthetic metadata must parse: {e}"),
        }
    }

    fn with_dep(from: &str, to: &'static str, kind: &'static str) -> Vec<Violation> {
        let mut packages = healthy();
        for (name, deps) in &mut packages {
            if *name == from {
                deps.push((to, kind));
            }
        }
        run(&packages)
    }

    #[test]
    fn healthy_workspace_passes() {
        assert_eq!(run(&healthy()), vec![]);
    }

    #[test]
    fn upward_normal_dependency_is_caught_and_named() {
        let v = with_dep("eg-memory", "eg-model", "normal");
        assert_eq!(v.len(), 1, "{v:?}");
        let message = v[0].to_string();
        assert!(
            message.contains("eg-memory -> eg-model (dependency)"),
            "{message}"
        );
        assert!(
            matches!(
                &v[0],
                Violation::Upward {
                    from_layer: 2,
                    to_layer: 4,
                    ..
                }
            ),
            "{v:?}"
        );
    }

    #[test]
    fn upward_build_dependency_is_caught() {
        let v = with_dep("eg-config", "eg-hardware", "build");
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].to_string()
                .contains("eg-config -> eg-hardware (build-dependency)")
        );
    }

    #[test]
    fn upward_dev_dependency_is_caught() {
        let v = with_dep("eg-kernel", "elastic-guardian", "dev");
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].to_string()
                .contains("eg-kernel -> elastic-guardian (dev-dependency)")
        );
    }

    #[test]
    fn facade_may_dev_depend_on_cli_but_not_depend() {
        assert_eq!(with_dep("elastic-guardian", "eg-cli", "dev"), vec![]);
        assert_eq!(with_dep("elastic-guardian", "eg-cli", "normal").len(), 1);
    }

    #[test]
    fn support_crate_and_xtask_dependencies_are_caught() {
        // A dependency on a support crate.
        let v = with_dep("eg-data", "eg-tests", "dev");
        assert!(
            matches!(&v[..], [Violation::OnSupportCrate { .. }]),
            "{v:?}"
        );
        // xtask must stay stand-alone.
        let v = with_dep("xtask", "eg-config", "normal");
        assert!(
            matches!(&v[..], [Violation::StandaloneDepends { .. }]),
            "{v:?}"
        );
    }

    #[test]
    fn unknown_and_missing_members_are_caught() {
        let mut packages = healthy();
        packages.retain(|(n, _)| *n != "eg-dist");
        packages.push(("eg-surprise", vec![]));
        let v = run(&packages);
        let text: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("workspace member eg-surprise is not in the layer order")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("eg-dist is in the layer order")),
            "{text:?}"
        );
    }

    #[test]
    fn malformed_metadata_is_an_error_not_a_panic() {
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"packages": [{"dependencies": []}]}"#,
            "\u{0}\u{1}junk",
        ] {
            assert!(check(bad, LAYERS, SUPPORT_CRATES).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn order_line_uses_arrows() {
        assert!(order_line().starts_with("eg-config → eg-hardware → "));
        assert!(order_line().ends_with(" → elastic-guardian → eg-cli"));
    }
}
