//! Reading the rows of a data file (JSONL, JSON, CSV, TSV, each maybe gzip'ed; Parquet; Arrow
//! IPC) as JSON objects, each with its location for error messages; and the files of a
//! `save_to_disk` directory ([`saved_dataset_files`]).

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowDictionaryKeyType, Date32Type, Date64Type, Decimal128Type, Decimal256Type,
    DurationMicrosecondType, DurationMillisecondType, DurationNanosecondType, DurationSecondType,
    Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    Time32MillisecondType, Time32SecondType, Time64MicrosecondType, Time64NanosecondType,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType, TimeUnit};
use flate2::read::MultiGzDecoder;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::ParquetMetaData;
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
    Tsv,
    Parquet,
    Arrow,
}

impl FileKind {
    /// The kind of a file by its extension (case-insensitive), if it is a data file: `.jsonl`,
    /// `.ndjson`, `.json`, `.csv`, `.tsv` (each also gzip'ed, `.jsonl.gz`), `.parquet`, `.arrow`.
    pub fn of(path: &str) -> Option<FileKind> {
        Self::with_gzip(path).map(|(kind, _)| kind)
    }

    /// [`FileKind::of`], and whether the file is gzip'ed.
    pub fn with_gzip(path: &str) -> Option<(FileKind, bool)> {
        let name = Path::new(path)
            .file_name()?
            .to_string_lossy()
            .to_ascii_lowercase();
        let (stem, gz) = match name.strip_suffix(".gz") {
            Some(stem) => (stem, true),
            None => (name.as_str(), false),
        };
        let ext = Path::new(stem).extension()?.to_string_lossy().into_owned();
        let kind = match ext.as_str() {
            "jsonl" | "ndjson" => FileKind::Jsonl,
            "json" => FileKind::Json,
            "csv" => FileKind::Csv,
            "tsv" => FileKind::Tsv,
            "parquet" if !gz => FileKind::Parquet,
            "arrow" if !gz => FileKind::Arrow,
            _ => return None,
        };
        Some((kind, gz))
    }
}

/// Read every row of a data file; locations name it by its path.
pub fn read_rows(path: &Path) -> Result<Vec<SourceRow>, DataError> {
    read_rows_named(path, &path.display().to_string())
}

/// Read every row of a data file; locations name it `shown` (the path as the manifest wrote it).
/// Lines of a gzip'ed file are those of its decompressed text.
pub fn read_rows_named(file_path: &Path, shown: &str) -> Result<Vec<SourceRow>, DataError> {
    let path = Path::new(shown);
    let (kind, gz) =
        FileKind::with_gzip(&file_path.to_string_lossy()).ok_or_else(|| DataError::FileType {
            path: shown.to_owned(),
            ext: file_type_of(file_path),
        })?;
    match kind {
        FileKind::Jsonl => read_jsonl_stream(file_path, path, gz),
        FileKind::Json => {
            let text = read_text(file_path, path, gz)?;
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
        FileKind::Csv => read_delimited(file_path, path, b',', "csv", gz),
        FileKind::Tsv => read_delimited(file_path, path, b'\t', "tsv", gz),
        FileKind::Parquet => read_parquet(file_path, path),
        FileKind::Arrow => read_arrow(file_path, path),
    }
}

/// `parquet`, `txt.gz`: the extension of a file, with the one before `.gz`.
fn file_type_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = |n: &str| {
        Path::new(n)
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
    };
    match name.strip_suffix(".gz").and_then(ext) {
        Some(inner) => format!("{inner}.gz"),
        None => ext(&name).unwrap_or_default(),
    }
}

/// Longest line a text data file may have (a JSON Lines record, a CSV line): a longer one is
/// reported with its line number and not read further, so that a hostile file's 1 GB line is
/// never held whole.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Largest uncompressed row group of a Parquet file that is read (`datasets` writes row groups
/// of at most 100 MB).
pub const MAX_ROW_GROUP_BYTES: u64 = 512 << 20;

/// Most columns a CSV or TSV header may have.
pub const MAX_COLUMNS: usize = 65_536;

fn open_bytes(file_path: &Path, gz: bool) -> Result<Box<dyn BufRead>, DataError> {
    let file = fs::File::open(file_path).map_err(|e| DataError::io("open", file_path, e))?;
    Ok(if gz {
        Box::new(BufReader::new(MultiGzDecoder::new(BufReader::new(file))))
    } else {
        Box::new(BufReader::new(file))
    })
}

fn too_long(shown: &Path, line: u64) -> DataError {
    DataError::Malformed {
        at: Location::line(shown, line),
        what: "text",
        message: format!("the line is longer than {MAX_LINE_BYTES} bytes"),
    }
}

/// Decode one line as UTF-8, naming the line and the byte where it stops being UTF-8.
fn utf8_line<'a>(bytes: &'a [u8], shown: &Path, line: u64) -> Result<&'a str, DataError> {
    std::str::from_utf8(bytes).map_err(|e| DataError::Malformed {
        at: Location::line(shown, line),
        what: "text",
        message: format!(
            "invalid utf-8 (byte 0x{:02x} at column {})",
            bytes[e.valid_up_to()],
            e.valid_up_to() + 1
        ),
    })
}

/// Call `f(number, line)` for each line of a file (1-based; the line without its `\n` or
/// `\r\n`, as `str::lines` gives it; a leading BOM dropped), reading one line at a time: a line
/// past [`MAX_LINE_BYTES`] or one that is not UTF-8 fails with its number, having read at most
/// the limit.
fn for_each_line(
    file_path: &Path,
    shown: &Path,
    gz: bool,
    mut f: impl FnMut(u64, &str) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut reader = open_bytes(file_path, gz)?;
    let action = if gz { "decompress" } else { "read" };
    let mut buf = Vec::new();
    for line in 1u64.. {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(action, file_path, e))?;
        if n == 0 {
            break;
        }
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.len() > MAX_LINE_BYTES {
            return Err(too_long(shown, line));
        }
        let text = utf8_line(body, shown, line)?;
        let text = if line == 1 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        f(line, text)?;
    }
    Ok(())
}

/// The whole text of a file, line by line through [`for_each_line`] (line ends become `\n`).
fn read_text(file_path: &Path, shown: &Path, gz: bool) -> Result<String, DataError> {
    let mut text = String::new();
    for_each_line(file_path, shown, gz, |_, line| {
        text.push_str(line);
        text.push('\n');
        Ok(())
    })?;
    Ok(text)
}

/// JSON Lines read line by line: memory is the rows plus one line.
fn read_jsonl_stream(
    file_path: &Path,
    shown: &Path,
    gz: bool,
) -> Result<Vec<SourceRow>, DataError> {
    let mut rows = Vec::new();
    for_each_line(file_path, shown, gz, |line, text| {
        jsonl_row(shown, line, text, &mut rows)
    })?;
    Ok(rows)
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
        jsonl_row(path, i as u64 + 1, line, &mut rows)?;
    }
    Ok(rows)
}

/// One JSON Lines line: blank lines are skipped, anything else must be an object.
fn jsonl_row(
    path: &Path,
    line_no: u64,
    line: &str,
    rows: &mut Vec<SourceRow>,
) -> Result<(), DataError> {
    if line.trim().is_empty() {
        return Ok(());
    }
    let at = Location::line(path, line_no);
    let value: Value = serde_json::from_str(line).map_err(|e| DataError::Malformed {
        at: at.clone(),
        what: "json",
        message: json_message(&e),
    })?;
    match value {
        Value::Object(fields) => {
            rows.push(SourceRow { at, fields });
            Ok(())
        }
        other => Err(DataError::Malformed {
            at,
            what: "row",
            message: format!("expected a json object, found {}", describe(&other)),
        }),
    }
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

fn read_delimited(
    file_path: &Path,
    path: &Path,
    delimiter: u8,
    what: &'static str,
    gz: bool,
) -> Result<Vec<SourceRow>, DataError> {
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
            csv::ErrorKind::Io(err) => {
                if let Some(long) = err.get_ref().and_then(|e| e.downcast_ref::<LineTooLong>()) {
                    return too_long(path, long.0);
                }
                if gz {
                    format!("cannot decompress: {err}")
                } else {
                    format!("cannot read: {err}")
                }
            }
            _ => e.to_string(),
        };
        DataError::Malformed { at, what, message }
    };
    let input = LineLimit {
        inner: open_bytes(file_path, gz)?,
        line: 1,
        run: 0,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .delimiter(delimiter)
        .from_reader(input);
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
    if headers.len() > MAX_COLUMNS {
        return Err(DataError::Malformed {
            at: Location::line(path, 1),
            what,
            message: format!(
                "the header has {} columns; at most {MAX_COLUMNS} are read",
                headers.len()
            ),
        });
    }
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

/// The payload of the I/O error [`LineLimit`] gives: the line that is too long.
#[derive(Debug)]
struct LineTooLong(u64);

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {} is longer than {MAX_LINE_BYTES} bytes", self.0)
    }
}

impl std::error::Error for LineTooLong {}

/// A reader that fails once a physical line grows past [`MAX_LINE_BYTES`], so that the CSV
/// reader (which grows its record buffer without bound) never holds more than one such line.
struct LineLimit<R> {
    inner: R,
    line: u64,
    run: usize,
}

impl<R: Read> Read for LineLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.line += 1;
                self.run = 0;
            } else {
                self.run += 1;
                if self.run > MAX_LINE_BYTES {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        LineTooLong(self.line),
                    ));
                }
            }
        }
        Ok(n)
    }
}

fn read_parquet(file_path: &Path, path: &Path) -> Result<Vec<SourceRow>, DataError> {
    let bad = |at: Location, e: parquet::errors::ParquetError| DataError::Malformed {
        at,
        what: "parquet",
        message: e.to_string(),
    };
    let file = fs::File::open(file_path).map_err(|e| DataError::io("open", file_path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| DataError::io("read", file_path, e))?
        .len();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(Location::whole(path), e))?;
    check_parquet_layout(builder.metadata(), file_len).map_err(|message| DataError::Malformed {
        at: Location::whole(path),
        what: "parquet",
        message,
    })?;
    let batches = builder
        .with_batch_size(1024)
        .build()
        .map_err(|e| bad(Location::whole(path), e))?;
    let mut rows = Vec::new();
    for batch in batches {
        let batch = batch.map_err(|e| DataError::Malformed {
            at: Location::row(path, rows.len()),
            what: "parquet",
            message: e.to_string(),
        })?;
        push_batch_rows(&batch, path, "parquet", &mut rows)?;
    }
    Ok(rows)
}

/// What the footer of a Parquet file claims, checked before any page is read: each row group's
/// uncompressed size (a small file claiming gigabytes is a compression bomb or a lie), and each
/// column chunk's byte range, which must lie inside the file (the `parquet` crate asserts that
/// a range is not negative, and panics when it is).
fn check_parquet_layout(meta: &ParquetMetaData, file_len: u64) -> Result<(), String> {
    for (i, rg) in meta.row_groups().iter().enumerate() {
        let claimed = u64::try_from(rg.total_byte_size()).unwrap_or(u64::MAX);
        if claimed > MAX_ROW_GROUP_BYTES {
            return Err(format!(
                "row group {i} holds {claimed} bytes uncompressed; at most \
                 {MAX_ROW_GROUP_BYTES} are read per row group (rewrite the file with smaller \
                 row groups)"
            ));
        }
        for (c, column) in rg.columns().iter().enumerate() {
            let start = column
                .dictionary_page_offset()
                .unwrap_or_else(|| column.data_page_offset());
            let len = column.compressed_size();
            let inside = u64::try_from(start)
                .ok()
                .zip(u64::try_from(len).ok())
                .and_then(|(s, l)| s.checked_add(l))
                .is_some_and(|end| end <= file_len);
            if !inside {
                return Err(format!(
                    "row group {i} column {c} (`{}`) claims bytes {start}..+{len}, outside the \
                     file of {file_len} bytes",
                    column.column_path()
                ));
            }
        }
    }
    Ok(())
}

/// The rows of one record batch, numbered on from `rows.len()`: each column's value as JSON
/// (`arrow_value`), keyed by the column's name.
fn push_batch_rows(
    batch: &RecordBatch,
    path: &Path,
    what: &'static str,
    rows: &mut Vec<SourceRow>,
) -> Result<(), DataError> {
    let schema = batch.schema();
    for r in 0..batch.num_rows() {
        let at = Location::row(path, rows.len());
        let mut fields = Map::new();
        for (field, column) in schema.fields().iter().zip(batch.columns()) {
            let value =
                arrow_value(column.as_ref(), r).map_err(|message| DataError::Malformed {
                    at: at.clone(),
                    what,
                    message: format!("column `{}`: {message}", field.name()),
                })?;
            fields.insert(field.name().clone(), value);
        }
        rows.push(SourceRow { at, fields });
    }
    Ok(())
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Arrow IPC: the stream format (what `datasets` writes: `save_to_disk`, its cache), or the file
/// format when the file opens with the `ARROW1` magic. Rows are numbered across record batches.
fn read_arrow(file_path: &Path, path: &Path) -> Result<Vec<SourceRow>, DataError> {
    let bad = |at: Location, e: ArrowError| DataError::Malformed {
        at,
        what: "arrow",
        message: e.to_string(),
    };
    let mut file = fs::File::open(file_path).map_err(|e| DataError::io("open", file_path, e))?;
    let mut magic = [0u8; 6];
    let file_format = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
    file.seek(SeekFrom::Start(0))
        .map_err(|e| DataError::io("read", file_path, e))?;
    let batches: Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>>> = if file_format {
        check_arrow_file_layout(&mut file).map_err(|e| match e {
            Layout::Io(e) => DataError::io("read", file_path, e),
            Layout::Bad(message) => DataError::Malformed {
                at: Location::whole(path),
                what: "arrow",
                message,
            },
        })?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| DataError::io("read", file_path, e))?;
        Box::new(
            arrow_ipc::reader::FileReader::try_new_buffered(file, None)
                .map_err(|e| bad(Location::whole(path), e))?,
        )
    } else {
        Box::new(
            arrow_ipc::reader::StreamReader::try_new_buffered(file, None)
                .map_err(|e| bad(Location::whole(path), e))?,
        )
    };
    let mut rows = Vec::new();
    for batch in batches {
        let batch = batch.map_err(|e| bad(Location::row(path, rows.len()), e))?;
        push_batch_rows(&batch, path, "arrow", &mut rows)?;
    }
    Ok(rows)
}

enum Layout {
    Io(std::io::Error),
    Bad(String),
}

/// What the footer of an Arrow IPC file claims, checked against the file's size before
/// `arrow-ipc` acts on it: the footer length (read into a buffer of that size), and each
/// dictionary and record batch block's offset and lengths (the reader allocates a block's length
/// before reading it, and unwraps a negative one). The stream format needs no such check: its
/// reader grows a body's buffer as the bytes arrive.
fn check_arrow_file_layout(file: &mut fs::File) -> Result<(), Layout> {
    let file_len = file.metadata().map_err(Layout::Io)?.len();
    let bad = |m: String| Err(Layout::Bad(m));
    if file_len < 16 {
        return bad(format!(
            "a file of {file_len} bytes is too short for the Arrow file format"
        ));
    }
    let mut tail = [0u8; 10];
    file.seek(SeekFrom::End(-10)).map_err(Layout::Io)?;
    file.read_exact(&mut tail).map_err(Layout::Io)?;
    let footer_len = match arrow_ipc::reader::read_footer_length(tail) {
        Ok(n) => n as u64,
        Err(e) => return bad(e.to_string()),
    };
    let Some(footer_start) = (file_len - 10).checked_sub(footer_len) else {
        return bad(format!(
            "the footer claims {footer_len} bytes, more than the file of {file_len} bytes"
        ));
    };
    let mut footer = vec![0u8; footer_len as usize];
    file.seek(SeekFrom::Start(footer_start))
        .map_err(Layout::Io)?;
    file.read_exact(&mut footer).map_err(Layout::Io)?;
    let footer = match arrow_ipc::root_as_footer(&footer) {
        Ok(f) => f,
        Err(e) => return bad(format!("unable to read the footer: {e}")),
    };
    let kinds = [
        ("dictionary", footer.dictionaries()),
        ("record batch", footer.recordBatches()),
    ];
    for (kind, blocks) in kinds {
        for (i, block) in blocks.into_iter().flatten().enumerate() {
            let (offset, meta, body) = (block.offset(), block.metaDataLength(), block.bodyLength());
            let end = u64::try_from(offset)
                .ok()
                .zip(u64::try_from(meta).ok())
                .zip(u64::try_from(body).ok())
                .and_then(|((o, m), b)| o.checked_add(m)?.checked_add(b));
            if end.is_none_or(|end| end > footer_start) {
                return bad(format!(
                    "block {i} ({kind}) claims {meta} metadata and {body} body bytes at offset \
                     {offset}, outside the {footer_start} bytes before the footer"
                ));
            }
        }
    }
    Ok(())
}

/// One Arrow value as JSON, as Parquet values are: numbers, strings, lists, objects; bytes as
/// (lossy) text; dates, times and decimals in their display form.
fn arrow_value(array: &dyn Array, i: usize) -> Result<Value, String> {
    if matches!(array.data_type(), DataType::Null) || array.is_null(i) {
        return Ok(Value::Null);
    }
    macro_rules! int {
        ($t:ty) => {
            Value::from(array.as_primitive::<$t>().value(i))
        };
    }
    let text = |s: &str| Value::String(s.to_owned());
    let bytes = |b: &[u8]| Value::String(String::from_utf8_lossy(b).into_owned());
    let shown = |s: Option<String>| s.map_or(Value::Null, Value::String);
    Ok(match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 => int!(Int8Type),
        DataType::Int16 => int!(Int16Type),
        DataType::Int32 => int!(Int32Type),
        DataType::Int64 => int!(Int64Type),
        DataType::UInt8 => int!(UInt8Type),
        DataType::UInt16 => int!(UInt16Type),
        DataType::UInt32 => int!(UInt32Type),
        DataType::UInt64 => int!(UInt64Type),
        DataType::Float16 => float(f64::from(array.as_primitive::<Float16Type>().value(i))),
        DataType::Float32 => float(f64::from(array.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => text(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => text(array.as_string::<i64>().value(i)),
        DataType::Utf8View => text(array.as_string_view().value(i)),
        DataType::Binary => bytes(array.as_binary::<i32>().value(i)),
        DataType::LargeBinary => bytes(array.as_binary::<i64>().value(i)),
        DataType::BinaryView => bytes(array.as_binary_view().value(i)),
        DataType::FixedSizeBinary(_) => bytes(array.as_fixed_size_binary().value(i)),
        DataType::List(_) => arrow_list(array.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => arrow_list(array.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(_, _) => arrow_list(array.as_fixed_size_list().value(i).as_ref())?,
        DataType::ListView(_) => arrow_list(array.as_list_view::<i32>().value(i).as_ref())?,
        DataType::LargeListView(_) => arrow_list(array.as_list_view::<i64>().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut m = Map::new();
            for (f, c) in fields.iter().zip(s.columns()) {
                m.insert(f.name().clone(), arrow_value(c.as_ref(), i)?);
            }
            Value::Object(m)
        }
        DataType::Map(_, _) => {
            let entries = array.as_map().value(i);
            let (keys, values) = (entries.column(0), entries.column(1));
            let mut m = Map::new();
            for j in 0..entries.len() {
                let key = match arrow_value(keys.as_ref(), j)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                m.insert(key, arrow_value(values.as_ref(), j)?);
            }
            Value::Object(m)
        }
        DataType::Dictionary(key, _) => match key.as_ref() {
            DataType::Int8 => arrow_dict::<Int8Type>(array, i)?,
            DataType::Int16 => arrow_dict::<Int16Type>(array, i)?,
            DataType::Int32 => arrow_dict::<Int32Type>(array, i)?,
            DataType::Int64 => arrow_dict::<Int64Type>(array, i)?,
            DataType::UInt8 => arrow_dict::<UInt8Type>(array, i)?,
            DataType::UInt16 => arrow_dict::<UInt16Type>(array, i)?,
            DataType::UInt32 => arrow_dict::<UInt32Type>(array, i)?,
            DataType::UInt64 => arrow_dict::<UInt64Type>(array, i)?,
            other => return Err(format!("unsupported dictionary key type {other}")),
        },
        DataType::Date32 => shown(
            array
                .as_primitive::<Date32Type>()
                .value_as_date(i)
                .map(|d| d.to_string()),
        ),
        DataType::Date64 => shown(
            array
                .as_primitive::<Date64Type>()
                .value_as_date(i)
                .map(|d| d.to_string()),
        ),
        DataType::Timestamp(unit, _) => shown(
            match unit {
                TimeUnit::Second => array
                    .as_primitive::<TimestampSecondType>()
                    .value_as_datetime(i),
                TimeUnit::Millisecond => array
                    .as_primitive::<TimestampMillisecondType>()
                    .value_as_datetime(i),
                TimeUnit::Microsecond => array
                    .as_primitive::<TimestampMicrosecondType>()
                    .value_as_datetime(i),
                TimeUnit::Nanosecond => array
                    .as_primitive::<TimestampNanosecondType>()
                    .value_as_datetime(i),
            }
            .map(|t| t.to_string()),
        ),
        DataType::Time32(TimeUnit::Second) => shown(
            array
                .as_primitive::<Time32SecondType>()
                .value_as_time(i)
                .map(|t| t.to_string()),
        ),
        DataType::Time32(TimeUnit::Millisecond) => shown(
            array
                .as_primitive::<Time32MillisecondType>()
                .value_as_time(i)
                .map(|t| t.to_string()),
        ),
        DataType::Time64(TimeUnit::Microsecond) => shown(
            array
                .as_primitive::<Time64MicrosecondType>()
                .value_as_time(i)
                .map(|t| t.to_string()),
        ),
        DataType::Time64(TimeUnit::Nanosecond) => shown(
            array
                .as_primitive::<Time64NanosecondType>()
                .value_as_time(i)
                .map(|t| t.to_string()),
        ),
        DataType::Decimal128(_, _) => {
            Value::String(array.as_primitive::<Decimal128Type>().value_as_string(i))
        }
        DataType::Decimal256(_, _) => {
            Value::String(array.as_primitive::<Decimal256Type>().value_as_string(i))
        }
        DataType::Duration(unit) => Value::from(match unit {
            TimeUnit::Second => array.as_primitive::<DurationSecondType>().value(i),
            TimeUnit::Millisecond => array.as_primitive::<DurationMillisecondType>().value(i),
            TimeUnit::Microsecond => array.as_primitive::<DurationMicrosecondType>().value(i),
            TimeUnit::Nanosecond => array.as_primitive::<DurationNanosecondType>().value(i),
        }),
        other => return Err(format!("unsupported arrow type {other}")),
    })
}

fn arrow_list(values: &dyn Array) -> Result<Value, String> {
    (0..values.len())
        .map(|j| arrow_value(values, j))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn arrow_dict<K: ArrowDictionaryKeyType>(array: &dyn Array, i: usize) -> Result<Value, String> {
    let d = array.as_dictionary::<K>();
    match d.key(i) {
        Some(k) => arrow_value(d.values().as_ref(), k),
        None => Ok(Value::Null),
    }
}

/// The Arrow files of a `datasets` `save_to_disk` directory, in order: a `Dataset`'s
/// (`state.json` lists them in `_data_files`), or the split `split` of a `DatasetDict`'s
/// (`dataset_dict.json` lists the splits, each a `Dataset` directory; without `split`, its only
/// split). `None` when `dir` is neither.
pub fn saved_dataset_files(
    dir: &Path,
    split: Option<&str>,
) -> Result<Option<Vec<PathBuf>>, DataError> {
    let err = |message: String, help: Option<String>| DataError::SavedDataset {
        path: dir.display().to_string(),
        message,
        help,
    };
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        let splits: Vec<String> = read_json(&dict)?
            .get("splits")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let listed = || Some(format!("its splits: {}", splits.join(", ")));
        let chosen = match split {
            Some(s) if splits.iter().any(|x| x == s) => s.to_owned(),
            Some(s) => {
                return Err(err(
                    format!("the saved DatasetDict has no split `{s}`"),
                    listed(),
                ));
            }
            None => match splits.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(err(
                        format!(
                            "the saved DatasetDict holds {} splits; choose one with `split:`",
                            splits.len()
                        ),
                        listed(),
                    ));
                }
            },
        };
        if chosen.contains(['/', '\\']) || chosen == ".." {
            return Err(err(format!("bad split name `{chosen}`"), None));
        }
        return match saved_dataset_files(&dir.join(&chosen), None)? {
            Some(files) => Ok(Some(files)),
            None => Err(err(
                format!("split `{chosen}` of the saved DatasetDict has no state.json"),
                None,
            )),
        };
    }
    let state = dir.join("state.json");
    if !state.is_file() {
        return Ok(None);
    }
    if let Some(s) = split {
        return Err(err(
            format!(
                "`split: {s}` picks a split of a saved DatasetDict, and this is one saved Dataset \
                 (state.json, no dataset_dict.json)"
            ),
            Some("drop `split:`".into()),
        ));
    }
    let state_json = read_json(&state)?;
    let entries = state_json
        .get("_data_files")
        .and_then(Value::as_array)
        .ok_or_else(|| err("state.json has no `_data_files` list".into(), None))?;
    let mut files = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(name) = entry.get("filename").and_then(Value::as_str) else {
            return Err(err(
                format!("state.json: `_data_files[{i}]` has no `filename`"),
                None,
            ));
        };
        if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
            return Err(err(
                format!("state.json: `_data_files[{i}]` is not a file name: `{name}`"),
                None,
            ));
        }
        let p = dir.join(name);
        if !p.is_file() {
            return Err(err(
                format!("state.json lists `{name}`, which is missing"),
                Some("the directory was copied in part: save it again with `save_to_disk`".into()),
            ));
        }
        files.push(p);
    }
    if files.is_empty() {
        return Err(err("state.json lists no data file".into(), None));
    }
    Ok(Some(files))
}

fn read_json(path: &Path) -> Result<Value, DataError> {
    let text = fs::read_to_string(path).map_err(|e| DataError::io("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::Malformed {
        at: Location::line(path, e.line() as u64),
        what: "json",
        message: json_message(&e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_line_error(name: &str, head: &[u8], tail: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let mut bytes = head.to_vec();
        bytes.resize(head.len() + MAX_LINE_BYTES + 10, b'a');
        bytes.extend_from_slice(tail);
        fs::write(&path, bytes).unwrap();
        read_rows_named(&path, name).unwrap_err().to_string()
    }

    /// Plain JSON Lines and CSV stop at the line limit and name the line.
    #[test]
    fn a_line_past_the_limit_is_reported_with_its_number() {
        let e = long_line_error("a.jsonl", b"{\"text\": \"x\"}\r\n{\"text\": \"", b"\"}\n");
        assert_eq!(
            e,
            format!("a.jsonl:2: malformed text: the line is longer than {MAX_LINE_BYTES} bytes")
        );
        let e = long_line_error("a.csv", b"text\nshort\n\"multi\nline\"\n", b"\n");
        assert_eq!(
            e,
            format!("a.csv:5: malformed text: the line is longer than {MAX_LINE_BYTES} bytes")
        );
    }

    /// CRLF ends, a BOM and a line of exactly the limit read as before.
    #[test]
    fn crlf_and_a_bom_read_as_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.jsonl");
        fs::write(&path, "\u{feff}{\"a\": 1}\r\n\r\n{\"a\": 2}").unwrap();
        let rows = read_rows(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].at, Location::line(&path, 3));
        assert_eq!(rows[1].fields["a"], 2);
    }
}
