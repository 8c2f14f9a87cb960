//! The configuration reference (`docs/config.md`, `eg config reference`), generated from the
//! JSON Schema so the documentation cannot drift from the code.

use serde_json::Value;

/// Sections in the order users meet them.
const SECTIONS: &[&str] = &[
    "run", "hardware", "memory", "data", "model", "train", "dist", "monitor", "export",
];

/// The configuration reference as Markdown: one table per section and sub-section with each
/// key's type, default and meaning.
pub fn reference_markdown() -> String {
    let schema = crate::json_schema();
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the code by `eg config reference`; do not edit by hand (a test compares it).\n\n\
         Layers, lowest precedence first: built-in defaults < files (`--config`, TOML/YAML/JSON by \
         extension; `extends = \"base.toml\"` pulls in base files first) < `EG_SECTION__KEY` \
         environment variables (e.g. `EG_TRAIN__OPTIMIZER__LR=3e-4`) < `--set key.path=value`. \
         Values given as text (environment, `--set`) are read as TOML values when they parse as one \
         (`3e-4`, `true`, `[\"q_proj\"]`, `{ rank = 8 }`), else as strings.\n\n\
         `eg config validate FILE...` checks files, `eg config show FILE...` prints every resolved \
         value with its source, `eg config schema` prints the JSON Schema for editors.\n",
    );
    for name in SECTIONS {
        if let Some(prop) = schema["properties"].get(*name) {
            section(&schema, name, prop, false, &mut out);
        }
    }
    out
}

fn resolve<'a>(schema: &'a Value, v: &'a Value) -> &'a Value {
    match v
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        Some(name) => &schema["$defs"][name],
        None => v,
    }
}

/// The non-null alternative of an `anyOf [X, null]`.
fn non_null<'a>(schema: &'a Value, v: &'a Value) -> (&'a Value, bool) {
    if let Some(alts) = v.get("anyOf").and_then(Value::as_array)
        && alts.len() == 2
        && let Some(x) = alts
            .iter()
            .find(|a| a.get("type").and_then(Value::as_str) != Some("null"))
    {
        return (resolve(schema, x), true);
    }
    (resolve(schema, v), false)
}

/// One table for the section at `path`; `array` marks an array of tables (`[[data.mix]]`),
/// whose `prop` is the item schema.
fn section(schema: &Value, path: &str, prop: &Value, array: bool, out: &mut String) {
    let (def, _) = non_null(schema, prop);
    let Some(props) = def.get("properties").and_then(Value::as_object) else {
        return;
    };
    let desc = prop
        .get("description")
        .or_else(|| def.get("description"))
        .and_then(Value::as_str)
        .unwrap_or("");
    out.push_str(&format!(
        "\n## `{open}{path}{close}`\n\n{desc}\n\n| key | type | default | meaning |\n|---|---|---|---|\n",
        open = if array { "[[" } else { "[" },
        close = if array { "]]" } else { "]" },
    ));
    let mut nested = Vec::new();
    for (key, p) in props {
        let (target, any_null) = non_null(schema, p);
        let optional = any_null
            || p.get("type")
                .and_then(Value::as_array)
                .is_some_and(|ts| ts.iter().any(|t| t == "null"));
        if target.get("properties").is_some() {
            nested.push((format!("{path}.{key}"), p, false));
            continue;
        }
        let item = target.get("items").map(|i| resolve(schema, i));
        let table_items = item.filter(|i| i.get("properties").is_some());
        let ty = type_name(schema, target);
        let default = match p.get("default") {
            Some(d) => format!("`{d}`"),
            None if optional => "unset".into(),
            None => String::new(),
        };
        let meaning = p
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .replace('\n', " ");
        out.push_str(&format!("| `{key}` | {ty} | {default} | {meaning} |\n"));
        if let Some(i) = table_items {
            nested.push((format!("{path}.{key}"), i, true));
        }
    }
    for (p, v, array) in nested {
        section(schema, &p, v, array, out);
    }
}

fn type_name(schema: &Value, v: &Value) -> String {
    if let Some(alts) = v.get("oneOf").and_then(Value::as_array) {
        let names: Vec<String> = alts
            .iter()
            .filter_map(|a| a.get("const").and_then(Value::as_str))
            .map(|s| format!("`{s}`"))
            .collect();
        return format!("one of {}", names.join(", "));
    }
    if v.get("anyOf").is_some() {
        // Byte sizes are the only untagged union of the format.
        return "bytes: integer or string with unit (`\"512MiB\"`)".into();
    }
    match v.get("type") {
        Some(Value::String(t)) if t == "array" => {
            let item = v
                .get("items")
                .map(|i| type_name(schema, resolve(schema, i)))
                .unwrap_or_default();
            format!("list of {item}")
        }
        Some(Value::String(t)) if t == "integer" => "integer".into(),
        Some(Value::String(t)) if t == "number" => "number".into(),
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "value".into(),
    }
}
