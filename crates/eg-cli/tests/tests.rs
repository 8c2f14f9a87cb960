//! End-to-end tests of the `eg` binary: exit codes and output of `eg config`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn eg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eg"))
        .args(args)
        .env_remove("EG_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("run eg")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/configs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn example_configs_are_valid() {
    let dir = examples();
    for name in ["tiny-pretrain.toml", "lora-sft.yaml", "base-cpu.toml"] {
        let f = dir.join(name);
        let out = eg(&["config", "validate", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        assert!(text(&out.stdout).starts_with("valid:"));
    }
}

#[test]
fn invalid_config_exits_2_and_names_the_key() {
    let f = examples().join("tiny-pretrain.toml");
    let out = eg(&[
        "config",
        "validate",
        f.to_str().unwrap(),
        "--set",
        "train.optimizer.lr=nan",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("`train.optimizer.lr` (from --set train.optimizer.lr=nan)"),
        "{err}"
    );
}

#[test]
fn validate_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[train]\nmax_steps = 0\n[train.optimizer]\nlr = -1.0\n").unwrap();
    let out = eg(&["config", "validate", "--json", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0]["key"], "train.max_steps");
    assert_eq!(errors[0]["kind"], "out-of-range");
    assert_eq!(errors[0]["origin"]["kind"], "file");
    assert_eq!(errors[0]["origin"]["line"], 2);
}

#[test]
fn env_variables_are_a_layer() {
    let f = examples().join("tiny-pretrain.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_eg"))
        .args(["config", "validate", f.to_str().unwrap()])
        .env("EG_TRAIN__MAX_STEPS", "-3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("environment variable EG_TRAIN__MAX_STEPS"),
        "{}",
        text(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_eg"))
        .args(["config", "validate", "--no-env", f.to_str().unwrap()])
        .env("EG_TRAIN__MAX_STEPS", "-3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn show_prints_values_with_sources() {
    let f = examples().join("lora-sft.yaml");
    let out = eg(&["config", "show", f.to_str().unwrap(), "--set", "run.seed=9"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.lines()
            .any(|l| l.starts_with("run.seed") && l.ends_with("# --set run.seed=9")),
        "{s}"
    );
    assert!(
        s.lines()
            .any(|l| l.starts_with("hardware.device") && l.contains("base-cpu.toml:3")),
        "{s}"
    );
    assert!(
        s.lines()
            .any(|l| l.starts_with("train.max_steps") && l.contains("lora-sft.yaml:")),
        "{s}"
    );
    assert!(
        s.lines()
            .any(|l| l.starts_with("dist.backend") && l.ends_with("# built-in default")),
        "{s}"
    );
}

#[test]
fn schema_is_json_schema() {
    let out = eg(&["config", "schema"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["$schema"].as_str().unwrap().contains("json-schema.org"));
    assert!(v["properties"]["train"].is_object());
}

#[test]
fn usage_errors_exit_2() {
    let out = eg(&["config", "validate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = eg(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_config_file_is_reported() {
    let out = eg(&["config", "validate", "/nonexistent/run.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/run.toml"));
}
