//! The dependency rule, checked on the real workspace.

use std::path::{Path, PathBuf};
use std::process::Command;

use eg_tests::layering::{LAYERS, SUPPORT_CRATES, check, order_line};

fn workspace_root() -> PathBuf {
    // This package lives in `<root>/tests`.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn cargo_metadata() -> TestResult<String> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace_root())
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn workspace_respects_the_layer_order() -> TestResult {
    let violations = check(&cargo_metadata()?, LAYERS, SUPPORT_CRATES)?;
    let report: Vec<String> = violations.iter().map(ToString::to_string).collect();
    assert!(
        report.is_empty(),
        "the dependency rule of ARCHITECTURE.md is broken:\n  {}\n(order, bottom to top: {})",
        report.join("\n  "),
        order_line()
    );
    Ok(())
}

#[test]
fn architecture_md_states_the_same_order() {
    let path = workspace_root().join("ARCHITECTURE.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let expected = order_line();
    let found = text
        .lines()
        .any(|line| line.trim().trim_matches('`').trim() == expected);
    assert!(
        found,
        "{} must contain the layer order as a line of its own, exactly:\n{expected}\n\
         (it is defined once, in eg_tests::layering::LAYERS)",
        path.display()
    );
}
