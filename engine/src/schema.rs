//! The manifest JSON Schema, generated from the same Rust types that validate manifests at run
//! time: [`crate::manifest::Header`] for the top level and each registered kind's `Params`.
//!
//! `stages` maps names to stages; a stage's `kind` selects its parameter schema through an
//! `if`/`then` per kind (editors complete and explain those far better than a `oneOf`).

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::manifest::{Executor, Header, Resources};
use crate::stage::Registry;

/// The schema's `$id`-less title.
pub const TITLE: &str = "burnish pipeline manifest";

/// The whole manifest schema, as `burnish schema` prints it and `schemas/pipeline.schema.json`
/// holds it.
pub fn pipeline_schema(registry: &Registry) -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let header = generator.root_schema_for::<Header>().to_value();
    let mut root = header.as_object().cloned().unwrap_or_default();
    let mut defs: Map<String, Value> = root
        .remove("$defs")
        .and_then(|d| d.as_object().cloned())
        .unwrap_or_default();

    let executor = generator.subschema_for::<Executor>().to_value();
    let resources = generator.subschema_for::<Resources>().to_value();
    let kinds: Vec<&str> = registry.kind_names();
    let mut branches = Vec::new();
    for entry in registry.public_kinds() {
        let mut s = entry.params_schema(&mut generator).to_value();
        let obj = s
            .as_object_mut()
            .expect("a stage kind's params schema is an object");
        let props = obj
            .entry("properties")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("properties is an object");
        props.insert(
            "kind".into(),
            json!({"const": entry.kind, "description": entry.about}),
        );
        props.insert("matrix".into(), json!({"$ref": "#/$defs/Matrix"}));
        props.insert("executor".into(), executor.clone());
        props.insert("resources".into(), resources.clone());
        let req = obj.entry("required").or_insert_with(|| json!([]));
        if let Some(r) = req.as_array_mut() {
            r.insert(0, json!("kind"));
        }
        obj.insert("additionalProperties".into(), json!(false));
        obj.remove("$schema");
        obj.insert("title".into(), json!(entry.kind));
        let name = format!("stage.{}", entry.kind);
        defs.insert(name.clone(), s);
        branches.push(json!({
            "if": {"properties": {"kind": {"const": entry.kind}}, "required": ["kind"]},
            "then": {"$ref": format!("#/$defs/{name}")}
        }));
    }
    for (k, v) in generator.take_definitions(true) {
        defs.entry(k).or_insert(v);
    }
    defs.insert(
        "Matrix".into(),
        json!({
            "description": "field paths of this stage mapped to lists of values; the stage and everything downstream fan out into one cell per combination, named like `split[eval_fraction=0.1]`",
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {"type": "array", "minItems": 1}
        }),
    );
    defs.insert(
        "Stage".into(),
        json!({
            "type": "object",
            "required": ["kind"],
            "properties": {"kind": {"enum": kinds, "description": "the stage kind"}},
            "allOf": branches
        }),
    );

    let props = root
        .entry("properties")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("properties is an object");
    props.insert(
        "stages".into(),
        json!({
            "description": "the stages, by name, in the order written",
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": "^[a-z0-9_-]+$", "maxLength": 64},
            "additionalProperties": {"$ref": "#/$defs/Stage"}
        }),
    );
    if let Some(req) = root.get_mut("required").and_then(Value::as_array_mut) {
        if !req.iter().any(|r| r == "stages") {
            req.push(json!("stages"));
        }
    } else {
        root.insert("required".into(), json!(["pipeline", "stages"]));
    }
    root.insert("title".into(), json!(TITLE));
    root.insert(
        "description".into(),
        json!("a burnish pipeline: stages by name, each with a `kind` and that kind's fields"),
    );
    root.insert("$defs".into(), Value::Object(sorted(defs)));
    Value::Object(root)
}

fn sorted(m: Map<String, Value>) -> Map<String, Value> {
    let mut entries: Vec<(String, Value)> = m.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.into_iter().collect()
}

/// One kind's parameter schema, with its definitions under `$defs` (for field lookups).
pub fn kind_schema(registry: &Registry, kind: &str) -> Value {
    let Some(entry) = registry.get(kind) else {
        return json!({});
    };
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let mut s = entry.params_schema(&mut generator).to_value();
    let defs = generator.take_definitions(true);
    if let Some(obj) = s.as_object_mut() {
        obj.insert("$defs".into(), Value::Object(defs));
    }
    s
}

/// The top-level field names of a kind's parameters.
pub fn top_fields(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for s in alternatives(schema, schema) {
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for k in props.keys() {
                if !out.contains(k) {
                    out.push(k.clone());
                }
            }
        }
    }
    out
}

/// Whether a dotted field path (`lora.rank`) names a field of the schema.
pub fn has_field(schema: &Value, path: &str) -> bool {
    let mut current: Vec<&Value> = vec![schema];
    for seg in path.split('.') {
        let mut next = Vec::new();
        for s in current {
            for alt in alternatives(schema, s) {
                if let Some(p) = alt.get("properties").and_then(|p| p.get(seg)) {
                    next.push(p);
                }
            }
        }
        if next.is_empty() {
            return false;
        }
        current = next;
    }
    true
}

/// A schema and everything it may stand for: its `$ref` target and `anyOf`/`oneOf`/`allOf`
/// members, recursively.
fn alternatives<'a>(root: &'a Value, s: &'a Value) -> Vec<&'a Value> {
    let mut out = vec![s];
    let mut i = 0;
    while i < out.len() && out.len() < 64 {
        let cur = out[i];
        if let Some(r) = cur.get("$ref").and_then(Value::as_str)
            && let Some(name) = r.strip_prefix("#/$defs/")
            && let Some(t) = root.get("$defs").and_then(|d| d.get(name))
        {
            out.push(t);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(arr) = cur.get(key).and_then(Value::as_array) {
                out.extend(arr.iter());
            }
        }
        i += 1;
    }
    out
}
