//! Reading the rows of a data file (JSONL, JSON, CSV, Parquet) as JSON objects, each with its
//! location for error messages.

use std::fs;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Number, Value};

use super::error::{DataError, Location};
use super::records::json_message;

/// One row of a source file.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceRow {
    pub at: Location,
    pub fields: Map<String, Value>,
}

/// The kinds of data file, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Jsonl,
    Json,
    Csv,
    Parquet,
}

impl FileKind {
    /// The kind of a file by its extension (case-insensitive), if it is a data file.
    pub fn of(path: &str) -> Option<FileKind> {
        let ext = Path::new(path)
            .extension()?
            .to_string_lossy()
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Some(FileKind::Jsonl),
            "json" => Some(FileKind::Json),
            "csv" => Some(FileKind::Csv),
            "parquet" => Some(FileKind::Parquet),
            _ => None,
        }
    }
}

/// Read every row of a data file; locations name it by its path.
pub fn read_rows(path: &Path) -> Result<Vec<SourceRow>, DataError> {
    read_rows_named(path, &path.display().to_string())
}

/// Read every row of a data file; locations name it `shown` (the path as the manifest wrote it).
pub fn read_rows_named(file_path: &Path, shown: &str) -> Result<Vec<SourceRow>, DataError> {
    let path = Path::new(shown);
    let kind = FileKind::of(&file_path.to_string_lossy()).ok_or_else(|| DataError::FileType {
        path: shown.to_owned(),
        ext: file_path
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })?;
    match kind {
        FileKind::Jsonl => read_jsonl(path, &read_text(file_path)?),
        FileKind::Json => {
            let text = read_text(file_path)?;
            // Many `.json` files on the hub are JSON Lines: a file that opens with an object is
            // read line by line, unless it is one object spread over several lines.
            if text.trim_start().starts_with('{') {
                if text.trim().lines().count() > 1
                    && let Ok(Value::Object(_)) = serde_json::from_str::<Value>(&text)
                {
                    return Err(DataError::Malformed {
                        at: Location::whole(path),
                        what: "json",
                        message: "expected a top-level array of objects (or one object per \
                                  line), found one object"
                            .into(),
                    });
                }
                read_jsonl(path, &text)
            } else {
                read_json_array(path, &text)
            }
        }
        FileKind::Csv => read_csv(file_path, path),
        FileKind::Parquet => read_parquet(file_path, path),
    }
}

fn read_text(path: &Path) -> Result<String, DataError> {
    let text = fs::read_to_string(path).map_err(|e| DataError::io("read", path, e))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

/// A short description of a JSON value for messages: `a number 42`, `a string "abc…"`.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("a boolean {b}"),
        Value::Number(n) => format!("a number {n}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                format!("a string {:?}", format!("{short}…"))
            } else {
                format!("a string {s:?}")
            }
        }
        Value::Array(a) => format!("a list of {}", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

fn read_jsonl(path: &Path, text: &str) -> Result<Vec<SourceRow>, DataError> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = Location::line(path, i as u64 + 1);
        let value: Value = serde_json::from_str(line).map_err(|e| DataError::Malformed {
            at: at.clone(),
            what: "json",
            message: json_message(&e),
        })?;
        match value {
            Value::Object(fields) => rows.push(SourceRow { at, fields }),
            other => {
                return Err(DataError::Malformed {
                    at,
                    what: "row",
                    message: format!("expected a json object, found {}", describe(&other)),
                });
            }
        }
    }
    Ok(rows)
}

fn read_json_array(path: &Path, text: &str) -> Result<Vec<SourceRow>, DataError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DataError::Malformed {
        at: Location::line(path, e.line() as u64),
        what: "json",
        message: json_message(&e),
    })?;
    let Value::Array(items) = value else {
        return Err(DataError::Malformed {
            at: Location::whole(path),
            what: "json",
            message: format!(
                "expected a top-level array of objects, found {}",
                describe(&value)
            ),
        });
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = Location::index(path, i);
            match item {
                Value::Object(fields) => Ok(SourceRow { at, fields }),
                other => Err(DataError::Malformed {
                    at,
                    what: "row",
                    message: format!("expected a json object, found {}", describe(&other)),
                }),
            }
        })
        .collect()
}

fn read_csv(file_path: &Path, path: &Path) -> Result<Vec<SourceRow>, DataError> {
    let csv_err = |e: csv::Error| {
        let at = match e.position() {
            Some(p) => Location::line(path, p.line()),
            None => Location::whole(path),
        };
        let message = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("expected {expected_len} fields as in the header, found {len}"),
            csv::ErrorKind::Utf8 { err, .. } => format!("invalid utf-8: {err}"),
            _ => e.to_string(),
        };
        DataError::Malformed {
            at,
            what: "csv",
            message,
        }
    };
    let file = fs::File::open(file_path).map_err(|e| DataError::io("open", file_path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(std::io::BufReader::new(file));
    let headers: Vec<String> = reader
        .headers()
        .map_err(csv_err)?
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let h = if i == 0 {
                h.trim_start_matches('\u{feff}')
            } else {
                h
            };
            h.to_owned()
        })
        .collect();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map_or(0, |p| p.line());
        let fields: Map<String, Value> = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.clone(), Value::String(v.to_owned())))
            .collect();
        rows.push(SourceRow {
            at: Location::line(path, line),
            fields,
        });
    }
    Ok(rows)
}

fn read_parquet(file_path: &Path, path: &Path) -> Result<Vec<SourceRow>, DataError> {
    let bad = |at: Location, e: parquet::errors::ParquetError| DataError::Malformed {
        at,
        what: "parquet",
        message: e.to_string(),
    };
    let file = fs::File::open(file_path).map_err(|e| DataError::io("open", file_path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(Location::whole(path), e))?;
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| bad(Location::whole(path), e))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let at = Location::row(path, i);
        let row = row.map_err(|e| bad(at.clone(), e))?;
        rows.push(SourceRow {
            at,
            fields: row_to_json(&row),
        });
    }
    Ok(rows)
}

fn row_to_json(row: &Row) -> Map<String, Value> {
    row.get_column_iter()
        .map(|(name, field)| (name.clone(), field_to_json(field)))
        .collect()
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn field_to_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float16(n) => float(f64::from(*n)),
        Field::Float(n) => float(f64::from(*n)),
        Field::Double(n) => float(*n),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(String::from_utf8_lossy(b.data()).into_owned()),
        Field::Group(row) => Value::Object(row_to_json(row)),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
        // Decimals, dates, times and timestamps: their display form.
        other => Value::String(other.to_string()),
    }
}
