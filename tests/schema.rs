//! The checked-in schema must equal the one generated from the code, and the schema must agree
//! with the runtime on what a manifest may say.

use std::path::Path;

#[test]
fn checked_in_schema_is_current() {
    let generated = burnish_engine::schema::pipeline_schema(&burnish_stages::registry());
    let text = format!("{}\n", serde_json::to_string_pretty(&generated).unwrap());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json");
    if std::env::var_os("BURNISH_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "schemas/pipeline.schema.json is stale: regenerate it with \
         `cargo run -- schema > schemas/pipeline.schema.json` (or BURNISH_BLESS=1 cargo test --test schema)"
    );
}

#[test]
fn schema_lists_every_public_kind_with_its_fields() {
    let reg = burnish_stages::registry();
    let s = burnish_engine::schema::pipeline_schema(&reg);
    let kinds = s["$defs"]["Stage"]["properties"]["kind"]["enum"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = kinds.iter().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(names, reg.kind_names());
    assert!(names.contains(&"dataset") && names.contains(&"data.split"));
    // The dataset kind's fields, straight from its params struct.
    let ds = &s["$defs"]["stage.dataset"];
    assert_eq!(ds["additionalProperties"], false);
    for f in ["kind", "path", "format", "columns", "matrix"] {
        assert!(
            ds["properties"].get(f).is_some(),
            "dataset schema lacks `{f}`"
        );
    }
    // Stage names are constrained as the runtime constrains them.
    assert_eq!(
        s["properties"]["stages"]["propertyNames"]["pattern"],
        "^[a-z0-9_-]+$"
    );
}
