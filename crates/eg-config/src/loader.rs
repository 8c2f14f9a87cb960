//! Layered loading: built-in defaults < files (with `extends`) < `EG_` variables < `--set`.
//!
//! Every layer is its own figment provider with its own metadata, so for any key the loader
//! can say which layer set it: a file and line, an environment variable, or a `--set`
//! argument.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider};

use crate::error::{Error, Located, Origin, did_you_mean};
use crate::locate::find_line;
use crate::wire::WireConfig;

/// Largest configuration file the loader reads.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Deepest `extends` chain allowed.
pub const MAX_EXTENDS_DEPTH: usize = 16;
/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "EG_";
/// Separator of nested keys in environment variable names.
pub const ENV_SEPARATOR: &str = "__";

/// Where the configuration comes from, in increasing precedence.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    sets: Vec<String>,
}

impl Sources {
    /// No files, no environment, no overrides: the built-in defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a configuration file (`.toml`, `.yaml`/`.yml` or `.json`); later files win.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.files.push(path.into());
        self
    }

    /// Adds several files.
    pub fn files<I, P>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        self.files.extend(paths.into_iter().map(Into::into));
        self
    }

    /// Takes `EG_SECTION__KEY=value` variables from this process's environment.
    ///
    /// Variables without `__` (such as `EG_LOG` and `EG_BACKTRACE`) are tool settings, not
    /// configuration keys, and are ignored here.
    pub fn process_env(self) -> Self {
        self.env_vars(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// Takes `EG_SECTION__KEY=value` variables from the given pairs (for tests and embedding).
    pub fn env_vars<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains(ENV_SEPARATOR))
            .collect();
        vars.sort();
        self.env.extend(vars);
        self
    }

    /// Adds a `key.path=value` override; later ones win.
    pub fn set(mut self, arg: impl Into<String>) -> Self {
        self.sets.push(arg.into());
        self
    }

    /// Adds several overrides.
    pub fn sets<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sets.extend(args.into_iter().map(Into::into));
        self
    }

    /// Reads and merges every layer, without validating values.
    pub fn resolve(&self) -> Result<Resolved, Error> {
        let mut layers = vec![Layer::defaults()?];
        for file in &self.files {
            load_file_chain(file, &mut Vec::new(), &mut layers)?;
        }
        for (var, value) in &self.env {
            layers.push(Layer::env(var, value)?);
        }
        for arg in &self.sets {
            layers.push(Layer::set(arg)?);
        }
        let mut figment = Figment::new();
        for layer in &layers {
            figment = figment.merge(layer.clone());
        }
        let names = layers
            .iter()
            .enumerate()
            .map(|(i, l)| (l.name.clone(), i))
            .collect();
        Ok(Resolved {
            figment,
            layers,
            names,
        })
    }

    /// Reads, merges and validates: the typed configuration or every error found.
    pub fn load(&self) -> Result<crate::Config, Error> {
        self.resolve()?.validate()
    }
}

/// Which kind of layer a value came from.
#[derive(Debug, Clone)]
enum LayerKind {
    Default,
    File { path: PathBuf, text: String },
    Env { var: String },
    Set { arg: String },
}

/// One provider: a dictionary with a unique name.
#[derive(Debug, Clone)]
struct Layer {
    name: String,
    kind: LayerKind,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut map = Map::new();
        map.insert(Profile::Default, self.dict.clone());
        Ok(map)
    }
}

impl Layer {
    fn defaults() -> Result<Layer, Error> {
        let value = Value::serialize(WireConfig::default()).map_err(|e| Error::Syntax {
            path: PathBuf::from("<built-in defaults>"),
            format: "internal",
            line: None,
            message: e.to_string(),
        })?;
        let dict = value.into_dict().unwrap_or_default();
        Ok(Layer {
            name: "built-in default".into(),
            kind: LayerKind::Default,
            dict,
        })
    }

    fn env(var: &str, value: &str) -> Result<Layer, Error> {
        let rest = &var[ENV_PREFIX.len()..];
        let parts: Vec<String> = rest
            .split(ENV_SEPARATOR)
            .map(|p| p.to_ascii_lowercase())
            .collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(Error::BadEnv {
                var: var.to_string(),
                problem: "empty key component",
            });
        }
        let dict = nest(&parts, parse_scalar(value));
        Ok(Layer {
            name: format!("env {var}"),
            kind: LayerKind::Env {
                var: var.to_string(),
            },
            dict,
        })
    }

    fn set(arg: &str) -> Result<Layer, Error> {
        let bad = |problem| Error::BadOverride {
            arg: arg.to_string(),
            problem,
        };
        let (key, value) = arg.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(bad("empty key"));
        }
        let parts: Vec<String> = key.split('.').map(str::to_string).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("empty key component"));
        }
        if !parts.iter().all(|p| {
            p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }) {
            return Err(bad(
                "key components may only hold letters, digits, `_` and `-`",
            ));
        }
        let dict = nest(&parts, parse_scalar(value));
        Ok(Layer {
            name: format!("--set {arg}"),
            kind: LayerKind::Set {
                arg: arg.to_string(),
            },
            dict,
        })
    }
}

/// A value given as text (environment, `--set`): read as a TOML value when it is one, so
/// `3e-4` is a number, `true` a bool, `["a", "b"]` a list and `{ rank = 8 }` a table; anything
/// else is the string itself.
fn parse_scalar(s: &str) -> Value {
    let trimmed = s.trim();
    if !trimmed.is_empty()
        && !trimmed.contains('\n')
        && let Ok(mut d) = toml::from_str::<Dict>(&format!("v = {trimmed}"))
        && let Some(v) = d.remove("v")
    {
        return v;
    }
    Value::from(s.to_string())
}

fn nest(parts: &[String], leaf: Value) -> Dict {
    let mut value = leaf;
    for part in parts.iter().skip(1).rev() {
        let mut d = Dict::new();
        d.insert(part.clone(), value);
        value = Value::from(d);
    }
    let mut top = Dict::new();
    if let Some(first) = parts.first() {
        top.insert(first.clone(), value);
    }
    top
}

/// Loads `path` after the files it `extends`, appending one layer per file.
fn load_file_chain(
    path: &Path,
    chain: &mut Vec<PathBuf>,
    layers: &mut Vec<Layer>,
) -> Result<(), Error> {
    let canonical = std::fs::canonicalize(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if chain.contains(&canonical) {
        let mut c = chain.clone();
        c.push(canonical);
        return Err(Error::Extends {
            path: path.to_path_buf(),
            problem: "forms a cycle",
            chain: c,
        });
    }
    if chain.len() >= MAX_EXTENDS_DEPTH {
        let mut c = chain.clone();
        c.push(canonical);
        return Err(Error::Extends {
            path: path.to_path_buf(),
            problem: "is nested too deeply (at most 16 files)",
            chain: c,
        });
    }
    let (text, mut dict) = read_file(path)?;
    chain.push(canonical);
    if let Some(ext) = dict.remove("extends") {
        let line = find_line(&text, &["extends"]);
        let bases: Vec<String> = match &ext {
            Value::String(_, s) => vec![s.clone()],
            Value::Array(_, items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| extends_type_error(path, line, &ext))?,
            other => return Err(extends_type_error(path, line, other)),
        };
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        for base in bases {
            load_file_chain(&dir.join(base), chain, layers)?;
        }
    }
    chain.pop();
    let index = layers.len();
    layers.push(Layer {
        name: format!("file#{index} {}", path.display()),
        kind: LayerKind::File {
            path: path.to_path_buf(),
            text,
        },
        dict,
    });
    Ok(())
}

fn extends_type_error(path: &Path, line: Option<usize>, found: &Value) -> Error {
    Error::WrongType {
        at: Located {
            key: "extends".into(),
            origin: Origin::File {
                path: path.to_path_buf(),
                line,
            },
        },
        found: found.to_actual().to_string(),
        expected: "a file name or a list of file names".into(),
    }
}

/// Reads one file: size limit, UTF-8 check, parse by extension, top level must be a table.
fn read_file(path: &Path) -> Result<(String, Dict), Error> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = match ext.as_str() {
        "toml" => "TOML",
        "yaml" | "yml" => "YAML",
        "json" => "JSON",
        _ => {
            return Err(Error::UnsupportedFormat {
                path: path.to_path_buf(),
                extension: ext,
            });
        }
    };
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_FILE_BYTES,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let offset = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..offset]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            return Err(Error::Encoding {
                path: path.to_path_buf(),
                offset,
                line,
            });
        }
    };
    let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let syntax = |line: Option<usize>, message: String| Error::Syntax {
        path: path.to_path_buf(),
        format,
        line,
        message,
    };
    if let Some(at) = body.find('\0') {
        return Err(syntax(
            Some(crate::locate::line_of(body, at)),
            "NUL byte in text (is this a binary file?)".into(),
        ));
    }
    if nesting_depth(body) > MAX_NESTING {
        return Err(syntax(
            None,
            format!("nested more than {MAX_NESTING} levels deep"),
        ));
    }
    if body.trim().is_empty() {
        return Ok((text, Dict::new()));
    }
    let value: Value = match format {
        "TOML" => toml::from_str(body).map_err(|e| {
            let line = e.span().map(|s| crate::locate::line_of(body, s.start));
            syntax(line, e.message().to_string())
        })?,
        "YAML" => {
            let v: Option<Value> = serde_yaml_ng::from_str(body).map_err(|e| {
                let line = e.location().map(|l| l.line());
                syntax(line, e.to_string())
            })?;
            match v {
                Some(v) => v,
                None => return Ok((text, Dict::new())),
            }
        }
        _ => serde_json::from_str(body).map_err(|e| syntax(Some(e.line()), e.to_string()))?,
    };
    match value {
        Value::Dict(_, d) => Ok((text, d)),
        other => Err(Error::NotATable {
            path: path.to_path_buf(),
            found: other.to_actual().to_string(),
        }),
    }
}

/// The object schema behind a property: follows `$ref` and the non-null arm of `anyOf`.
fn object_schema<'a>(
    schema: &'a serde_json::Value,
    p: &'a serde_json::Value,
) -> &'a serde_json::Value {
    let follow = |v: &'a serde_json::Value| -> &'a serde_json::Value {
        match v
            .get("$ref")
            .and_then(serde_json::Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
        {
            Some(name) => &schema["$defs"][name],
            None => v,
        }
    };
    if let Some(alts) = p.get("anyOf").and_then(serde_json::Value::as_array)
        && let Some(obj) = alts
            .iter()
            .map(follow)
            .find(|a| a.get("properties").is_some())
    {
        return obj;
    }
    follow(p)
}

/// Deepest bracket nesting the loader accepts (guards the parsers' recursion).
const MAX_NESTING: usize = 64;

/// Bracket nesting depth, counting `[`/`{` outside quoted strings; also YAML indentation
/// levels are bounded by the YAML parser itself.
fn nesting_depth(text: &str) -> usize {
    let mut depth = 0usize;
    let mut max = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' && q == '"' {
                escaped = true;
            } else if c == q || c == '\n' {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The merged layers, before validation.
#[derive(Debug)]
pub struct Resolved {
    figment: Figment,
    layers: Vec<Layer>,
    names: HashMap<String, usize>,
}

/// One resolved leaf value and where it came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// Dotted key path.
    pub key: String,
    /// The value, rendered as JSON.
    pub value: serde_json::Value,
    /// Where the value came from.
    pub origin: Origin,
}

impl Resolved {
    /// The origin of the value at `key` (dotted path).
    ///
    /// A key inside a list (`train.optimizer.betas.1`) reports the origin of the list.
    pub fn origin(&self, key: &str) -> Origin {
        let mut k = key;
        loop {
            if let Ok(v) = self.figment.find_value(k) {
                if k != key && !matches!(v, Value::Array(..)) {
                    // The key is absent below a table that exists.
                    return Origin::NotSet;
                }
                return self.origin_of_tag(v.tag(), k);
            }
            match k.rsplit_once('.') {
                Some((parent, _)) => k = parent,
                None => return Origin::Unknown,
            }
        }
    }

    fn origin_of_tag(&self, tag: Tag, key: &str) -> Origin {
        let Some(meta) = self.figment.get_metadata(tag) else {
            return Origin::Unknown;
        };
        let Some(&i) = self.names.get(meta.name.as_ref()) else {
            return Origin::Unknown;
        };
        match &self.layers[i].kind {
            LayerKind::Default => Origin::Default,
            LayerKind::File { path, text } => {
                let parts: Vec<&str> = key.split('.').collect();
                Origin::File {
                    path: path.clone(),
                    line: find_line(text, &parts),
                }
            }
            LayerKind::Env { var } => Origin::Env { var: var.clone() },
            LayerKind::Set { arg } => Origin::Set { arg: arg.clone() },
        }
    }

    pub(crate) fn located(&self, key: &str) -> Located {
        Located {
            key: key.to_string(),
            origin: self.origin(key),
        }
    }

    /// Every leaf value with its origin, sorted by key.
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        let top: Dict = self.figment.extract().unwrap_or_default();
        for key in top.keys() {
            if let Ok(v) = self.figment.find_value(key) {
                self.walk(key, &v, &mut out);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    fn walk(&self, key: &str, v: &Value, out: &mut Vec<Entry>) {
        if let Value::Dict(_, d) = v {
            for (k, child) in d {
                self.walk(&format!("{key}.{k}"), child, out);
            }
            return;
        }
        let value = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
        out.push(Entry {
            key: key.to_string(),
            value,
            origin: self.origin_of_tag(v.tag(), key),
        });
    }

    /// The merged wire configuration, with every figment error mapped to a located error.
    ///
    /// All unknown keys are reported together (found by walking the merged values against the
    /// schema); otherwise each section is deserialized on its own so one error per section is
    /// reported rather than only the first of the file.
    pub fn wire(&self) -> Result<WireConfig, Error> {
        let unknown = self.unknown_keys();
        if !unknown.is_empty() {
            return Err(Error::from_list(unknown)
                .err()
                .unwrap_or(Error::Many(Vec::new())));
        }
        let mut errors = Vec::new();
        let mut w = WireConfig::default();
        macro_rules! section {
            ($($name:ident),+) => {$(
                match self.figment.focus(stringify!($name)).extract() {
                    Ok(v) => w.$name = v,
                    Err(e) => errors.extend(e.into_iter().map(|mut e| {
                        e.path.insert(0, stringify!($name).to_string());
                        self.map_figment_error(e)
                    })),
                }
            )+};
        }
        section!(
            run, hardware, memory, data, model, train, dist, monitor, export
        );
        Error::from_list(errors)?;
        Ok(w)
    }

    /// Every key of the merged configuration that the schema does not know, with suggestions.
    fn unknown_keys(&self) -> Vec<Error> {
        let schema = crate::json_schema();
        let top: Dict = self.figment.extract().unwrap_or_default();
        let mut out = Vec::new();
        self.walk_unknown(&schema, &schema, "", &top, &mut out);
        out
    }

    fn walk_unknown(
        &self,
        schema: &serde_json::Value,
        def: &serde_json::Value,
        prefix: &str,
        dict: &Dict,
        out: &mut Vec<Error>,
    ) {
        let Some(props) = def.get("properties").and_then(serde_json::Value::as_object) else {
            return;
        };
        for (k, v) in dict {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match props.get(k) {
                None => out.push(Error::UnknownKey {
                    at: self.located(&key),
                    suggestion: did_you_mean(k, props.keys().map(String::as_str)),
                    allowed: props.keys().cloned().collect(),
                }),
                Some(p) => match v {
                    Value::Dict(_, child) => {
                        let target = object_schema(schema, p);
                        self.walk_unknown(schema, target, &key, child, out);
                    }
                    // Arrays of tables (`[[data.mix]]`): each item against the item schema.
                    Value::Array(_, items) => {
                        if let Some(item) = object_schema(schema, p).get("items") {
                            let target = object_schema(schema, item);
                            for (i, it) in items.iter().enumerate() {
                                if let Value::Dict(_, child) = it {
                                    self.walk_unknown(
                                        schema,
                                        target,
                                        &format!("{key}.{i}"),
                                        child,
                                        out,
                                    );
                                }
                            }
                        }
                    }
                    _ => {}
                },
            }
        }
    }

    /// Validates the merged configuration: the typed [`crate::Config`] or every error found.
    pub fn validate(&self) -> Result<crate::Config, Error> {
        let wire = self.wire()?;
        crate::validate::validate(wire, self)
    }

    fn map_figment_error(&self, e: figment::Error) -> Error {
        use figment::error::Kind;
        let mut path = e.path.clone();
        if let Kind::UnknownField(field, _) = &e.kind
            && path.last() != Some(field)
        {
            path.push(field.clone());
        }
        let key = path.join(".");
        let at = self.located(&key);
        match e.kind {
            Kind::UnknownField(field, allowed) => Error::UnknownKey {
                at,
                suggestion: did_you_mean(&field, allowed.iter().copied()),
                allowed: allowed.iter().map(|s| s.to_string()).collect(),
            },
            Kind::UnknownVariant(found, allowed) => Error::InvalidValue {
                at,
                suggestion: did_you_mean(&found, allowed.iter().copied()),
                found: format!("{found:?}"),
                allowed: allowed.join(", "),
            },
            Kind::InvalidType(actual, expected) => Error::WrongType {
                at,
                found: actual.to_string(),
                expected,
            },
            Kind::InvalidValue(actual, expected) => Error::InvalidValue {
                at,
                found: actual.to_string(),
                allowed: expected,
                suggestion: None,
            },
            Kind::InvalidLength(n, expected) => Error::InvalidValue {
                at,
                found: format!("{n} items"),
                allowed: expected,
                suggestion: None,
            },
            Kind::MissingField(_) => Error::Missing {
                at,
                why: "this key has no default and must be set",
            },
            Kind::DuplicateField(_) => Error::InvalidValue {
                at,
                found: "the key twice".into(),
                allowed: "each key once".into(),
                suggestion: None,
            },
            other => Error::WrongType {
                at,
                found: other.to_string(),
                expected: "a value of this key's type".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_ignores_strings() {
        assert_eq!(nesting_depth("a = [[1], {b = 2}]"), 2);
        assert_eq!(nesting_depth("a = \"[[[[\""), 0);
        assert_eq!(nesting_depth("a = '[[[[' "), 0);
    }

    #[test]
    fn scalars_parse_leniently() {
        assert_eq!(parse_scalar("3e-4").to_f64(), Some(3e-4));
        assert_eq!(parse_scalar("true").to_bool(), Some(true));
        assert_eq!(
            parse_scalar("builtin:tiny-llama").as_str(),
            Some("builtin:tiny-llama")
        );
        assert_eq!(parse_scalar("runs/a b").as_str(), Some("runs/a b"));
        assert_eq!(
            parse_scalar("[\"q_proj\", \"v_proj\"]")
                .into_array()
                .map(|a| a.len()),
            Some(2)
        );
        assert!(parse_scalar("nan").to_f64().is_some_and(f64::is_nan));
    }
}
