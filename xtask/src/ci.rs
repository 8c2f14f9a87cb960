//! `cargo xtask ci`: the checks CI runs, cheapest first.
//!
//! The last step, `assets`, runs the suites that need the real test assets:
//! by convention they are `#[ignore]`d (so plain `cargo test` stays offline)
//! and live in a test module whose name starts with `real_` (`real_assets`,
//! `real_text`, ...). The step first runs `cargo xtask fetch-assets` (which
//! only verifies when the assets are already there), then
//! `cargo test --workspace --tests -- --ignored real_`. Nothing is skipped
//! silently: without network or assets the step fails; `--skip-assets` is
//! the explicit way out.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, project_root};

/// Which steps to skip.
#[derive(Debug, Default)]
pub(crate) struct Options {
    skip: Vec<&'static str>,
}

/// One check: a name and the cargo invocation that performs it.
struct Step {
    name: &'static str,
    /// Work done in-process before the cargo invocation.
    prepare: Option<fn() -> Result<()>>,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

fn fetch_assets() -> Result<()> {
    crate::assets::run(&crate::assets::Options::default())
        .context("the real test assets are needed; without network use --skip-assets")
}

/// The steps, cheapest first.
const STEPS: &[Step] = &[
    Step {
        name: "fmt",
        prepare: None,
        args: &["fmt", "--all", "--", "--check"],
        env: &[],
    },
    Step {
        name: "clippy",
        prepare: None,
        args: &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        env: &[],
    },
    Step {
        name: "layering",
        prepare: None,
        // The rule's unit tests and the check of the real workspace and ARCHITECTURE.md.
        args: &[
            "test", "-p", "eg-tests", "--lib", "--test", "tests", "--", "layering",
        ],
        env: &[],
    },
    Step {
        name: "tests",
        prepare: None,
        args: &["test", "--workspace"],
        env: &[],
    },
    Step {
        name: "doc",
        prepare: None,
        args: &["doc", "--workspace", "--no-deps"],
        env: &[("RUSTDOCFLAGS", "-Dwarnings")],
    },
    Step {
        name: "assets",
        prepare: Some(fetch_assets),
        args: &["test", "--workspace", "--tests", "--", "--ignored", "real_"],
        env: &[],
    },
];

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut options = Self::default();
        for arg in args {
            let Some(step) = arg
                .strip_prefix("--skip-")
                .and_then(|name| STEPS.iter().find(|s| s.name == name))
            else {
                let names: Vec<&str> = STEPS.iter().map(|s| s.name).collect();
                bail!(
                    "unknown option `{arg}` for `cargo xtask ci`; \
                     use --skip-STEP with STEP one of {}",
                    names.join(", ")
                );
            };
            options.skip.push(step.name);
        }
        Ok(options)
    }
}

pub(crate) fn run(options: &Options) -> Result<()> {
    let root = project_root();
    let started = Instant::now();
    let mut timings: Vec<(&str, Option<Duration>)> = Vec::new();
    for step in STEPS {
        if options.skip.contains(&step.name) {
            println!("xtask ci: skipping `{}` (--skip-{})", step.name, step.name);
            timings.push((step.name, None));
            continue;
        }
        let shown = render(step);
        println!("\nxtask ci: [{}] {shown}", step.name);
        let t0 = Instant::now();
        if let Some(prepare) = step.prepare
            && let Err(e) = prepare()
        {
            print_timings(&timings, started.elapsed());
            return Err(e.context(format!("step `{}` failed", step.name)));
        }
        let status = Command::new(cargo())
            .args(step.args)
            .envs(step.env.iter().copied())
            .current_dir(&root)
            .status()
            .with_context(|| format!("step `{}`: cannot start `{shown}`", step.name))?;
        let took = t0.elapsed();
        timings.push((step.name, Some(took)));
        println!("xtask ci: [{}] took {:.1}s", step.name, took.as_secs_f64());
        if !status.success() {
            print_timings(&timings, started.elapsed());
            bail!(
                "step `{}` failed ({status}) after {:.1}s; reproduce with: {shown}",
                step.name,
                took.as_secs_f64()
            );
        }
    }
    print_timings(&timings, started.elapsed());
    println!("xtask ci: all steps passed");
    Ok(())
}

fn render(step: &Step) -> String {
    let env: Vec<String> = step.env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    format!("{}cargo {}", env.concat(), step.args.join(" "))
}

fn print_timings(timings: &[(&str, Option<Duration>)], total: Duration) {
    println!("\nxtask ci: timings");
    for (name, took) in timings {
        match took {
            Some(t) => println!("  {name:<10} {:>8.1}s", t.as_secs_f64()),
            None => println!("  {name:<10}  skipped"),
        }
    }
    println!("  {:<10} {:>8.1}s", "total", total.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_run_cheapest_first() {
        let names: Vec<&str> = STEPS.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["fmt", "clippy", "layering", "tests", "doc", "assets"]
        );
    }

    #[test]
    fn skip_options_are_checked() {
        let options = Options::parse(&["--skip-clippy".to_owned()]).unwrap();
        assert_eq!(options.skip, ["clippy"]);
        let err = Options::parse(&["--skip-lint".to_owned()]).unwrap_err();
        assert!(
            err.to_string()
                .contains("fmt, clippy, layering, tests, doc, assets"),
            "{err}"
        );
    }
}
