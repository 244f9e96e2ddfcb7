//! GGUF reading, writing and quantization, held against ggml's own C and the Python `gguf`
//! package through the golden files in `fixtures/gguf/` (made by `fixtures/gguf/make_golden.py`;
//! see its doc for what each file is and where it came from).
//!
//! `BURNISH_BLESS=1` rewrites `fixtures/gguf/burnish_written.gguf`, the file the golden script
//! hands to `gguf.GGUFReader` and to ggml's `gguf_init_from_file`.

use std::path::{Path, PathBuf};

use burnish_stages::export::gguf::{
    GgmlType, GgufError, GgufFile, GgufWriter, MetaArray, MetaValue, dequantize, quantize,
};
use miette::Diagnostic;

const ROWS: usize = 8;
const COLS: usize = 512;
/// The types with golden files, in the order the golden script writes them.
const GOLDEN_TYPES: [GgmlType; 7] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::BF16,
    GgmlType::F16,
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/gguf")
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `fixtures/gguf/input.f32`: 8 rows × 512, seeded (see `make_input` in the golden script).
fn input() -> Vec<f32> {
    let x = f32s(&read_fixture("input.f32"));
    assert_eq!(x.len(), ROWS * COLS);
    x
}

/// The first `rows` rows of the input, each cut to `cols` values.
fn input_block(rows: usize, cols: usize) -> Vec<f32> {
    let x = input();
    (0..rows)
        .flat_map(|r| x[r * COLS..r * COLS + cols].to_vec())
        .collect()
}

/// Where two byte strings first differ, as "block B (byte I): ours XX, reference YY".
fn first_difference(ty: GgmlType, ours: &[u8], reference: &[u8]) -> String {
    if ours.len() != reference.len() {
        return format!("lengths {} vs {}", ours.len(), reference.len());
    }
    match ours.iter().zip(reference).position(|(a, b)| a != b) {
        None => "none".into(),
        Some(i) => format!(
            "block {} (byte {} of it): ours {:#04x}, reference {:#04x}; {} bytes differ in all",
            i / ty.type_size(),
            i % ty.type_size(),
            ours[i],
            reference[i],
            ours.iter().zip(reference).filter(|(a, b)| a != b).count()
        ),
    }
}

// =============================================================================================
// Quantizers against the references

/// Every type's bytes equal ggml's C reference quantizer (`quantize_row_*_ref`,
/// `ggml_fp32_to_bf16_row_ref`, `ggml_fp32_to_fp16_row`) on the same input; for Q8_0, Q4_0, Q5_0,
/// BF16 and F16 the golden script also checked that the `gguf` package's quantizer agrees.
#[test]
fn quantize_is_byte_equal_to_ggml() {
    let x = input();
    for ty in GOLDEN_TYPES {
        let golden = read_fixture(&format!("golden_{}.bin", ty.name()));
        let ours = quantize(ty, &x, COLS).unwrap();
        assert!(
            ours == golden,
            "{ty} differs from ggml: {}",
            first_difference(ty, &ours, &golden)
        );
    }
}

/// Dequantization equals, bit for bit, both `gguf.quants.dequantize` and ggml's
/// `dequantize_row_*` (the golden script checked those two agree).
#[test]
fn dequantize_is_bit_equal_to_ggml_and_gguf() {
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let golden = read_fixture(&format!("golden_{}.bin", ty.name()));
        let reference = f32s(&read_fixture(&format!("dequant_{}.f32", ty.name())));
        let ours = dequantize(ty, &golden, ROWS * COLS).unwrap();
        let mismatches: Vec<usize> = (0..ours.len())
            .filter(|&i| ours[i].to_bits() != reference[i].to_bits())
            .collect();
        assert!(
            mismatches.is_empty(),
            "{ty}: {} values differ, first at {}: ours {}, reference {}",
            mismatches.len(),
            mismatches[0],
            ours[mismatches[0]],
            reference[mismatches[0]]
        );
    }
}

/// NaNs (quiet, signalling, with payloads), infinities, zeros, subnormals and rounding ties:
/// BF16 and F16 bytes equal ggml's C conversions (for F16, numpy keeps NaN payload bits that ggml
/// replaces by 0x7e00; burnish follows ggml).
#[test]
fn bf16_and_f16_edge_values_match_ggml() {
    let x = f32s(&read_fixture("specials.f32"));
    for ty in [GgmlType::BF16, GgmlType::F16] {
        let golden = read_fixture(&format!("golden_specials_{}.bin", ty.name()));
        let ours = quantize(ty, &x, 1).unwrap();
        for (i, v) in x.iter().enumerate() {
            assert_eq!(
                ours[2 * i..2 * i + 2],
                golden[2 * i..2 * i + 2],
                "{ty} of {v:e} (bits {:#010x})",
                v.to_bits()
            );
        }
    }
}

/// Large tensors are quantized on several threads; the bytes are those of the one-thread path
/// (each row of 512 quantized alone, below the threshold).
#[test]
fn threaded_quantization_gives_the_same_bytes() {
    let x = input();
    let big: Vec<f32> = (0..40).flat_map(|_| x.iter().copied()).collect(); // 163840 values
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0] {
        let whole = quantize(ty, &big, COLS).unwrap();
        let by_row: Vec<u8> = big
            .chunks(COLS)
            .flat_map(|row| quantize(ty, row, COLS).unwrap())
            .collect();
        assert!(whole == by_row, "{ty}");
    }
}

// =============================================================================================
// Error bounds

/// The per-value bound of each type on one block, or None for the k-quants (see
/// `k_quant_rms_error`).
///
/// The 32-value types store `q·d` with d rounded to f16, which adds up to `q_max · δ(d)` where
/// δ(d) = max(|d|·2⁻¹¹, 2⁻²⁵) (relative in f16's normal range, half the smallest subnormal below;
/// a block of 1e-20s has d = 0 and dequantizes to zeros, within this bound).
///
/// - F32: exact.
/// - F16: relative 2⁻¹¹ for normal values; absolute 2⁻²⁵ below.
/// - BF16: relative 2⁻⁸ (normal values).
/// - Q8_0: amax/254 (half a step of d = amax/127) + 127·δ(d).
/// - Q4_0: |d| = amax/8, a full step: x/d = +8 (opposite in sign to the block's extreme value)
///   clamps to level 7; + 8·δ(d).
/// - Q5_0: |d| = amax/16, likewise; + 16·δ(d).
fn bound(ty: GgmlType, block: &[f32], x: f32) -> Option<f32> {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let delta = |d: f32| (d * 2f32.powi(-11)).max(2f32.powi(-25));
    let slack = 1.0 + 1e-6;
    Some(match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 if x.abs() >= 6.103_515_6e-5 => x.abs() * 2f32.powi(-11),
        GgmlType::F16 => 2f32.powi(-25),
        GgmlType::BF16 => x.abs() * 2f32.powi(-8),
        GgmlType::Q8_0 => (amax / 254.0 + 127.0 * delta(amax / 127.0)) * slack,
        GgmlType::Q4_0 => (amax / 8.0 + 8.0 * delta(amax / 8.0)) * slack,
        GgmlType::Q5_0 => (amax / 16.0 + 16.0 * delta(amax / 16.0)) * slack,
        GgmlType::Q4_K | GgmlType::Q6_K => return None,
    })
}

fn check_bounds(ty: GgmlType, x: &[f32], y: &[f32], what: &str) {
    assert_eq!(x.len(), y.len());
    for (bx, by) in x.chunks(ty.block_size()).zip(y.chunks(ty.block_size())) {
        for (&v, &w) in bx.iter().zip(by) {
            if let Some(b) = bound(ty, bx, v) {
                assert!(
                    (v - w).abs() <= b,
                    "{what}: {ty} of {v} gave {w}, error {} > bound {b}",
                    (v - w).abs()
                );
            }
        }
    }
}

fn relative_rms(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let sig: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
    (err / sig).sqrt()
}

#[test]
fn per_value_error_bounds_hold() {
    let x = input();
    for ty in GgmlType::ALL {
        let y = dequantize(ty, &quantize(ty, &x, COLS).unwrap(), x.len()).unwrap();
        check_bounds(ty, &x, &y, "input.f32");
    }
}

/// Q4_K and Q6_K optimize their scales, so they have no simple per-value bound; their RMS error
/// relative to the RMS of the values, measured on the Gaussian, Laplace and uniform rows of the
/// input (rows 0–4), is 0.056–0.085 for Q4_K and 0.014–0.022 for Q6_K. The test asserts 0.09 and
/// 0.023 per row, and that both beat the 32-value types of the same width (Q4_0: 0.066–0.108,
/// Q5_0: 0.031–0.051) on each such row.
#[test]
fn k_quant_rms_error() {
    let x = input();
    let rms = |ty: GgmlType, row: &[f32]| {
        let y = dequantize(ty, &quantize(ty, row, COLS).unwrap(), COLS).unwrap();
        relative_rms(row, &y)
    };
    for (r, row) in x.chunks(COLS).enumerate().take(5) {
        let (q4k, q6k) = (rms(GgmlType::Q4_K, row), rms(GgmlType::Q6_K, row));
        let (q4_0, q5_0) = (rms(GgmlType::Q4_0, row), rms(GgmlType::Q5_0, row));
        assert!(q4k < 0.09, "row {r}: Q4_K relative RMS {q4k}");
        assert!(q6k < 0.023, "row {r}: Q6_K relative RMS {q6k}");
        assert!(q4k < q4_0, "row {r}: Q4_K {q4k} vs Q4_0 {q4_0}");
        assert!(q6k < q5_0, "row {r}: Q6_K {q6k} vs Q5_0 {q5_0}");
    }
}

/// Blocks ggml treats specially: all zeros, constants, values below `GROUP_MAX_EPS` (1e-15).
#[test]
fn degenerate_blocks() {
    let zeros = vec![0f32; 256];
    for ty in GgmlType::ALL {
        let q = quantize(ty, &zeros, 256).unwrap();
        assert!(q.iter().all(|&b| b == 0) || ty == GgmlType::Q4_0 || ty == GgmlType::Q5_0);
        assert_eq!(dequantize(ty, &q, 256).unwrap(), zeros, "{ty}");
    }
    // Q4_0/Q5_0 store zeros as level 8/16 with d = 0: 0x88 bytes.
    assert!(
        quantize(GgmlType::Q4_0, &zeros, 256).unwrap()[2..18]
            .iter()
            .all(|&b| b == 0x88)
    );

    let tiny = vec![1e-20f32; 256];
    let q6 = quantize(GgmlType::Q6_K, &tiny, 256).unwrap();
    assert!(
        q6.iter().all(|&b| b == 0),
        "Q6_K: below 1e-15 the block is zeroed"
    );

    let constant = vec![0.75f32; 256];
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K] {
        let y = dequantize(ty, &quantize(ty, &constant, 256).unwrap(), 256).unwrap();
        assert!(
            y.iter().all(|&v| (v - 0.75).abs() < 0.75 / 64.0),
            "{ty}: {:?}",
            &y[..4]
        );
    }
}

// =============================================================================================
// Files

fn every_metadata_value() -> Vec<(&'static str, MetaValue)> {
    vec![
        ("general.architecture", MetaValue::String("llama".into())),
        ("t.u8", MetaValue::U8(200)),
        ("t.i8", MetaValue::I8(-100)),
        ("t.u16", MetaValue::U16(60000)),
        ("t.i16", MetaValue::I16(-30000)),
        ("t.u32", MetaValue::U32(4_000_000_000)),
        ("t.i32", MetaValue::I32(-2_000_000_000)),
        ("t.f32", MetaValue::F32(0.1)),
        ("t.bool", MetaValue::Bool(true)),
        ("t.string", MetaValue::String("héllo, gguf ✓".into())),
        ("t.u64", MetaValue::U64((1 << 63) + 5)),
        ("t.i64", MetaValue::I64(-(1 << 62))),
        ("t.f64", MetaValue::F64(std::f64::consts::E)),
        ("t.arr.u8", MetaArray::U8(vec![1, 2, 255]).into()),
        ("t.arr.i32", MetaArray::I32(vec![-1, 0, 7]).into()),
        ("t.arr.u32", MetaArray::U32(vec![3, 4_000_000_000]).into()),
        ("t.arr.f32", MetaArray::F32(vec![0.5, -1.25]).into()),
        (
            "t.arr.string",
            MetaArray::String(vec![
                "<s>".into(),
                "</s>".into(),
                "▁the".into(),
                String::new(),
            ])
            .into(),
        ),
        ("t.arr.bool", MetaArray::Bool(vec![true, false]).into()),
        ("t.arr.i64", MetaArray::I64(vec![-5, 1 << 40]).into()),
        ("t.arr.f64", MetaArray::F64(vec![1e300, -0.0]).into()),
    ]
}

/// Shape (PyTorch order) of the test tensor of each type: [4, 256] for the k-quants, [3, 64]
/// otherwise.
fn test_shape(ty: GgmlType) -> [usize; 2] {
    if ty.block_size() == 256 {
        [4, 256]
    } else {
        [3, 64]
    }
}

/// The file the golden script checks with `gguf.GGUFReader` and ggml (`check_burnish_gguf`
/// there mirrors this): every metadata type, an empty array, alignment 64, an odd-sized F32
/// tensor, a vector, and one tensor of each golden type.
fn burnish_file() -> GgufWriter {
    let x = input();
    let mut w = GgufWriter::new();
    for (k, v) in every_metadata_value() {
        w.set(k, v);
    }
    w.set("t.arr.empty", MetaArray::U32(vec![]).into());
    w.set_alignment(64);
    let f32_bytes = |v: &[f32]| quantize(GgmlType::F32, v, v.len()).unwrap();
    w.add_tensor("f32.odd", &[3, 5], GgmlType::F32, f32_bytes(&x[..15]))
        .unwrap();
    w.add_tensor(
        "f32.vector",
        &[7],
        GgmlType::F32,
        f32_bytes(&x[COLS..COLS + 7]),
    )
    .unwrap();
    for ty in GOLDEN_TYPES {
        let [rows, cols] = test_shape(ty);
        let data = quantize(ty, &input_block(rows, cols), cols).unwrap();
        w.add_tensor(
            &format!("{}.weight", ty.name().to_lowercase()),
            &[rows, cols],
            ty,
            data,
        )
        .unwrap();
    }
    w
}

/// The writer's bytes are those of `fixtures/gguf/burnish_written.gguf`, which the golden script
/// showed `gguf.GGUFReader` and ggml's `gguf_init_from_file` (llama.cpp's loader: strict
/// offsets, data read back) accept with every value, shape, offset and data byte as written.
#[test]
fn writer_output_is_the_file_python_and_ggml_accepted() {
    let bytes = burnish_file().to_bytes().unwrap();
    let path = fixtures().join("burnish_written.gguf");
    if std::env::var("BURNISH_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &bytes).unwrap();
    }
    let committed = read_fixture("burnish_written.gguf");
    assert!(
        bytes == committed,
        "the writer's output changed; rerun with BURNISH_BLESS=1, then fixtures/gguf/make_golden.py"
    );
}

/// Write every metadata type and a tensor of every type, read it back from disk: metadata in
/// order and equal, shapes, and values within each type's bound (and equal to dequantizing the
/// written bytes).
#[test]
fn round_trip_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.gguf");
    let mut w = GgufWriter::new();
    for (k, v) in every_metadata_value() {
        w.set(k, v);
    }
    w.set("t.arr.empty", MetaArray::String(vec![]).into());
    let mut originals = Vec::new();
    for ty in GgmlType::ALL {
        let [rows, cols] = test_shape(ty);
        let x = input_block(rows, cols);
        let name = format!("{}.weight", ty.name().to_lowercase());
        w.add_tensor(&name, &[rows, cols], ty, quantize(ty, &x, cols).unwrap())
            .unwrap();
        originals.push((name, ty, [rows, cols], x));
    }
    w.write(&path).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file is left"
    );

    let f = GgufFile::read(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(f, GgufFile::parse(&bytes).unwrap());
    assert_eq!((f.version, f.alignment), (3, 32));
    let mut expected: Vec<(String, MetaValue)> = every_metadata_value()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    expected.push(("t.arr.empty".into(), MetaArray::String(vec![]).into()));
    assert_eq!(
        f.metadata, expected,
        "general.alignment is not written when it is 32"
    );
    assert_eq!(f.tensors.len(), GgmlType::ALL.len());
    for (name, ty, shape, x) in originals {
        let t = f.tensor(&name).unwrap();
        assert_eq!((t.ty, t.shape.as_slice()), (ty, &shape[..]), "{name}");
        assert_eq!(
            t.ne,
            vec![shape[1] as u64, shape[0] as u64],
            "{name}: ne is reversed"
        );
        let y = f.tensor_f32(&bytes, &name).unwrap();
        let direct = dequantize(ty, &quantize(ty, &x, shape[1]).unwrap(), x.len()).unwrap();
        assert_eq!(y, direct, "{name}");
        check_bounds(ty, &x, &y, &name);
        if matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K) {
            let limit = if ty == GgmlType::Q4_K { 0.09 } else { 0.023 };
            assert!(
                relative_rms(&x, &y) < limit,
                "{name}: {}",
                relative_rms(&x, &y)
            );
        }
    }
}

/// A file written by the Python `gguf` package (`GGUFWriter`): burnish reads its metadata with
/// the right types and its tensors with the bytes written.
#[test]
fn reads_a_file_written_by_python_gguf() {
    let bytes = read_fixture("python_written.gguf");
    let f = GgufFile::read(&fixtures().join("python_written.gguf")).unwrap();
    assert_eq!(f.metadata, {
        let mut m: Vec<(String, MetaValue)> = every_metadata_value()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        // gguf writes t.f32 from the Python float 0.1: the nearest f32
        m.iter_mut()
            .filter(|(k, _)| k == "t.f32")
            .for_each(|(_, v)| *v = MetaValue::F32(0.1));
        m
    });
    let x = input();
    let odd = f.tensor("f32.odd").unwrap();
    assert_eq!(odd.shape, vec![3, 5]);
    assert_eq!(f.tensor_f32(&bytes, "f32.odd").unwrap(), x[..15]);
    assert_eq!(
        f.tensor_f32(&bytes, "f32.vector").unwrap(),
        x[COLS..COLS + 7]
    );
    for ty in GOLDEN_TYPES {
        let t = f
            .tensor(&format!("{}.weight", ty.name().to_lowercase()))
            .unwrap();
        assert_eq!((t.ty, t.shape.as_slice()), (ty, &[ROWS, COLS][..]));
        let golden = read_fixture(&format!("golden_{}.bin", ty.name()));
        assert!(f.tensor_bytes(&bytes, t).unwrap() == golden, "{ty}");
    }
}

// =============================================================================================
// Layout

/// The data section starts aligned; tensor i's offset is the sum of the padded sizes before it;
/// padding is zeros; an odd-sized tensor (60 bytes) does not disturb what follows.
#[test]
fn layout_is_packed_and_aligned() {
    for alignment in [32u32, 64, 256] {
        let mut w = GgufWriter::new();
        w.set("general.name", MetaValue::String("layout".into()));
        w.set_alignment(alignment);
        let sizes = [
            (vec![3, 5], 60usize),
            (vec![2, 32], 256),
            (vec![1], 4),
            (vec![9], 36),
        ];
        for (i, (shape, n)) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..*n).map(|b| (b % 251) as u8 + 1).collect();
            w.add_tensor(&format!("t{i}"), shape, GgmlType::F32, data)
                .unwrap();
        }
        let bytes = w.to_bytes().unwrap();
        let f = GgufFile::parse(&bytes).unwrap();
        let a = alignment as u64;
        assert_eq!(f.alignment, alignment);
        assert_eq!(f.data_offset % a, 0);
        assert_eq!(
            f.get("general.alignment"),
            (alignment != 32).then_some(&MetaValue::U32(alignment))
        );
        let mut running = 0u64;
        for (t, (_, n)) in f.tensors.iter().zip(&sizes) {
            assert_eq!(t.offset, running, "{} (alignment {alignment})", t.name);
            let start = (f.data_offset + t.offset) as usize;
            let data = f.tensor_bytes(&bytes, t).unwrap();
            assert_eq!(data.len(), *n);
            assert!(data.iter().all(|&b| b != 0));
            let padded = (*n as u64).div_ceil(a) * a;
            assert!(
                bytes[start + n..start + padded as usize]
                    .iter()
                    .all(|&b| b == 0)
            );
            running += padded;
        }
        assert_eq!(
            bytes.len() as u64,
            f.data_offset + running,
            "the last tensor is padded too"
        );
    }
}

#[test]
fn set_replaces_in_place() {
    let mut w = GgufWriter::new();
    w.set("a", MetaValue::U32(1));
    w.set("b", MetaValue::U32(2));
    w.set("a", MetaValue::String("one".into()));
    let f = GgufFile::parse(&w.to_bytes().unwrap()).unwrap();
    assert_eq!(
        f.metadata,
        vec![
            ("a".to_string(), MetaValue::String("one".into())),
            ("b".to_string(), MetaValue::U32(2))
        ]
    );
    assert!(f.tensors.is_empty());
}

#[test]
fn summaries_for_inspect() {
    let tokens: Vec<String> = (0..512).map(|i| format!("tok{i}")).collect();
    let v: MetaValue = MetaArray::String(tokens).into();
    assert_eq!(v.type_name(), "array");
    assert_eq!(
        v.summary(),
        r#"[string × 512] "tok0", "tok1", "tok2", "tok3", "tok4", "tok5", …"#
    );
    assert_eq!(
        MetaValue::from(MetaArray::I32(vec![])).summary(),
        "[i32 × 0]"
    );
    assert_eq!(MetaValue::F32(1e-5).summary(), "1e-5");
    assert_eq!(MetaValue::U32(4096).summary(), "4096");
    assert_eq!(MetaValue::String("llama".into()).summary(), "\"llama\"");
    let long = "x".repeat(100);
    assert_eq!(
        MetaValue::String(long).summary(),
        format!("\"{}\"… (100 bytes)", "x".repeat(80))
    );
    assert_eq!(MetaValue::U32(7).as_u32(), Some(7));
    assert_eq!(
        MetaValue::U64(7).as_u32(),
        None,
        "no conversion between integer types"
    );
    assert_eq!(MetaValue::F32(0.5).as_f32(), Some(0.5));
    assert_eq!(MetaValue::String("s".into()).as_str(), Some("s"));
}

#[test]
fn ggml_type_table() {
    let table: Vec<(u32, &str, usize, usize)> = GgmlType::ALL
        .iter()
        .map(|t| (t.id(), t.name(), t.block_size(), t.type_size()))
        .collect();
    assert_eq!(
        table,
        vec![
            (0, "F32", 1, 4),
            (1, "F16", 1, 2),
            (2, "Q4_0", 32, 18),
            (6, "Q5_0", 32, 22),
            (8, "Q8_0", 32, 34),
            (12, "Q4_K", 256, 144),
            (14, "Q6_K", 256, 210),
            (30, "BF16", 1, 2),
        ]
    );
    for t in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(t.id()), Some(t));
    }
    assert_eq!(GgmlType::from_id(13), None);
    assert_eq!(GgmlType::Q4_K.row_bytes(4096), 16 * 144);
}

// =============================================================================================
// Errors: corrupt files, bad input

/// A small file with a known layout, for patching:
///
/// ```text
///   0 header (24)
///  24 key "a" (8 + 1), type u32 at 33, value at 37
///  41 key "arr" (8 + 3), type at 52, element type u8 at 56, count at 60, 3 bytes at 68
///  71 tensor "w": name (8 + 1), n_dims at 80, ne at 84 and 92, type at 100, offset at 104
/// 112 tensor "v": name (8 + 1), n_dims at 121, ne at 125, type at 133, offset at 137
/// 145 padding → data at 160: "w" Q8_0 [2, 32] (68 bytes, padded to 96), "v" F32 [4] (16 bytes)
/// ```
fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("a", MetaValue::U32(7));
    w.set("arr", MetaArray::U8(vec![1, 2, 3]).into());
    let x: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
    w.add_tensor(
        "w",
        &[2, 32],
        GgmlType::Q8_0,
        quantize(GgmlType::Q8_0, &x, 32).unwrap(),
    )
    .unwrap();
    w.add_tensor("v", &[4], GgmlType::F32, vec![0; 16]).unwrap();
    let bytes = w.to_bytes().unwrap();
    // the layout above
    assert_eq!(&bytes[24..32], &1u64.to_le_bytes());
    assert_eq!(&bytes[33..37], &4u32.to_le_bytes());
    assert_eq!(&bytes[60..68], &3u64.to_le_bytes());
    assert_eq!(&bytes[100..104], &8u32.to_le_bytes());
    assert_eq!(&bytes[137..145], &96u64.to_le_bytes());
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(f.data_offset, 160);
    assert_eq!(bytes.len(), 160 + 96 + 32);
    bytes
}

fn patch(bytes: &[u8], at: usize, with: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + with.len()].copy_from_slice(with);
    b
}

fn code(e: &GgufError) -> String {
    e.code().map(|c| c.to_string()).unwrap_or_default()
}

/// Read from disk, so that messages carry the path.
fn read_err(dir: &Path, name: &str, bytes: &[u8]) -> (GgufError, String) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let e = GgufFile::read(&path).expect_err("a corrupt file must not parse");
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(!msg.ends_with('.'), "{msg}");
    (e, msg)
}

#[test]
fn corrupt_files_give_errors_with_path_and_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = small_file();

    let (e, msg) = read_err(d, "header.gguf", &good[..10]);
    assert_eq!(code(&e), "burnish::gguf::truncated");
    assert_eq!(
        msg,
        format!(
            "header needs 8 bytes at offset 8, only 2 remaining in `{}`",
            d.join("header.gguf").display()
        )
    );

    let (e, msg) = read_err(d, "magic.gguf", &patch(&good, 0, b"GGML"));
    assert_eq!(code(&e), "burnish::gguf::magic");
    assert!(msg.contains("\"GGML\""), "{msg}");

    let (e, msg) = read_err(d, "version.gguf", &patch(&good, 4, &1u32.to_le_bytes()));
    assert_eq!(code(&e), "burnish::gguf::version");
    assert!(msg.starts_with("unsupported GGUF version 1"), "{msg}");

    // a key whose length field claims 2^62 bytes
    let (e, msg) = read_err(
        d,
        "keylen.gguf",
        &patch(&good, 24, &(1u64 << 62).to_le_bytes()),
    );
    assert_eq!(code(&e), "burnish::gguf::truncated");
    assert!(
        msg.starts_with("key #0 needs 4611686018427387904 bytes at offset 32, only 256 remaining"),
        "{msg}"
    );

    // an array whose count claims 2^40 elements: refused before any allocation
    let (e, msg) = read_err(
        d,
        "count.gguf",
        &patch(&good, 60, &(1u64 << 40).to_le_bytes()),
    );
    assert_eq!(code(&e), "burnish::gguf::truncated");
    assert!(msg.starts_with("array `arr` (1099511627776 × u8) needs 1099511627776 bytes at offset 68, only 220 remaining"), "{msg}");

    let (e, msg) = read_err(d, "vtype.gguf", &patch(&good, 33, &13u32.to_le_bytes()));
    assert_eq!(code(&e), "burnish::gguf::value_type");
    assert!(
        msg.starts_with("key `a` has unknown value type 13"),
        "{msg}"
    );

    let (e, msg) = read_err(d, "nested.gguf", &patch(&good, 56, &9u32.to_le_bytes()));
    assert_eq!(code(&e), "burnish::gguf::nested_array");
    assert!(msg.contains("`arr`"), "{msg}");

    let (e, msg) = read_err(d, "ttype.gguf", &patch(&good, 100, &13u32.to_le_bytes()));
    assert_eq!(code(&e), "burnish::gguf::tensor_type");
    assert!(
        msg.starts_with("tensor `w` has ggml type 13 (Q5_K)"),
        "{msg}"
    );
    let (_, msg) = read_err(d, "ttype99.gguf", &patch(&good, 100, &99u32.to_le_bytes()));
    assert!(
        msg.starts_with("tensor `w` has ggml type 99 (unknown)"),
        "{msg}"
    );

    // the last tensor's data cut short
    let (e, msg) = read_err(d, "short.gguf", &good[..good.len() - 20]);
    assert_eq!(code(&e), "burnish::gguf::tensor_bounds");
    assert_eq!(
        msg,
        format!(
            "tensor `v` needs 16 bytes at offset 256, only 12 remaining in `{}`",
            d.join("short.gguf").display()
        )
    );

    // offsets that are not the running padded sum (llama.cpp rejects them; Python accepts them)
    let (e, msg) = read_err(d, "packed.gguf", &patch(&good, 137, &128u64.to_le_bytes()));
    assert_eq!(code(&e), "burnish::gguf::not_packed");
    assert!(
        msg.starts_with("tensor `v` has data offset 128, expected 96"),
        "{msg}"
    );
    let (e, _) = read_err(
        d,
        "misaligned.gguf",
        &patch(&good, 137, &68u64.to_le_bytes()),
    );
    assert_eq!(code(&e), "burnish::gguf::not_packed");

    // a row of 33 values is not a whole number of Q8_0 blocks
    let (e, msg) = read_err(d, "row.gguf", &patch(&good, 84, &33u64.to_le_bytes()));
    assert_eq!(code(&e), "burnish::gguf::shape");
    assert!(
        msg.contains("rows of 33 values are not a whole number of Q8_0 blocks of 32"),
        "{msg}"
    );

    let (e, _) = read_err(d, "dims.gguf", &patch(&good, 80, &5u32.to_le_bytes()));
    assert_eq!(code(&e), "burnish::gguf::tensor_dims");

    // alignment must be a u32 power of two
    let mut w = GgufWriter::new();
    w.set_alignment(48);
    assert_eq!(code(&w.to_bytes().unwrap_err()), "burnish::gguf::alignment");
    w.set("general.alignment", MetaValue::U64(64));
    w.set_alignment(64);
    assert_eq!(code(&w.to_bytes().unwrap_err()), "burnish::gguf::key_type");
}

/// Duplicate keys and tensor names, spliced in by hand (the writer refuses to make them).
#[test]
fn duplicates_are_rejected() {
    let mut w = GgufWriter::new();
    w.set("k1", MetaValue::U8(1));
    w.set("k2", MetaValue::U8(2));
    let bytes = w.to_bytes().unwrap();
    // header (24), "k1" (8 + 2), type (4), value (1); then the second key's length (8) and "k2"
    let second_key = 24 + 8 + 2 + 4 + 1 + 8;
    assert_eq!(&bytes[second_key..second_key + 2], b"k2");
    let dup = patch(&bytes, second_key + 1, b"1");
    let e = GgufFile::parse(&dup).unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::duplicate_key");
    assert_eq!(e.to_string(), "key `k1` appears twice");

    let mut w = GgufWriter::new();
    w.add_tensor("a", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    w.add_tensor("b", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    let bytes = w.to_bytes().unwrap();
    let second_name = 24 + (8 + 1 + 4 + 8 + 4 + 8) + 8;
    assert_eq!(bytes[second_name], b'b');
    let e = GgufFile::parse(&patch(&bytes, second_name, b"a")).unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::duplicate_tensor");
}

/// No prefix of a file and no single flipped byte makes the reader panic or allocate wildly.
/// Every prefix that cuts into a tensor's data is an error; one that only drops the padding after
/// the last tensor is a file llama.cpp loads too (its mmap loader checks each tensor's bytes, not
/// the padding).
#[test]
fn every_truncation_and_byte_flip_is_an_error_or_a_file() {
    let good = small_file();
    let data_end = 160 + 96 + 16;
    for n in 0..good.len() {
        assert_eq!(
            GgufFile::parse(&good[..n]).is_ok(),
            n >= data_end,
            "prefix of {n} bytes"
        );
    }
    for i in 0..good.len() {
        for flip in [0xff, 0x80, 0x01] {
            let mut b = good.clone();
            b[i] ^= flip;
            if let Ok(f) = GgufFile::parse(&b) {
                for t in &f.tensors {
                    f.tensor_f32(&b, &t.name).unwrap();
                }
            }
        }
    }
}

#[test]
fn writer_refuses_bad_tensors() {
    let mut w = GgufWriter::new();
    let long = "x".repeat(64);
    let e = w
        .add_tensor(&long, &[1], GgmlType::F32, vec![0; 4])
        .unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::tensor_name");
    assert_eq!(
        e.to_string(),
        format!("tensor name `{long}` is 64 bytes, the limit is 63")
    );
    w.add_tensor(&"y".repeat(63), &[1], GgmlType::F32, vec![0; 4])
        .unwrap();

    let e = w
        .add_tensor("5d", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])
        .unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::tensor_dims");

    let e = w
        .add_tensor("short", &[2, 32], GgmlType::Q8_0, vec![0; 34])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "tensor `short` (Q8_0 [2, 32]) needs 68 bytes of data, got 34"
    );

    let e = w
        .add_tensor("rows", &[2, 48], GgmlType::Q8_0, vec![0; 68])
        .unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::shape");
    assert!(
        e.to_string()
            .contains("rows of 48 values are not a whole number of Q8_0 blocks of 32")
    );

    w.add_tensor("ok", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    let e = w
        .add_tensor("ok", &[1], GgmlType::F32, vec![0; 4])
        .unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::duplicate_tensor");

    let dir = tempfile::tempdir().unwrap();
    let e = w.write(&dir.path().join("missing/dir/x.gguf")).unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::io");
    assert!(e.to_string().starts_with("cannot write `"), "{e}");
}

#[test]
fn quantize_refuses_bad_rows() {
    let x = vec![0.5f32; 96];
    let e = quantize(GgmlType::Q4_K, &x, 96).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Q4_K needs rows that are a whole number of 256-value blocks, got rows of 96"
    );
    assert_eq!(code(&e), "burnish::gguf::row_length");
    let e = quantize(GgmlType::Q8_0, &x, 64).unwrap_err();
    assert_eq!(
        e.to_string(),
        "96 values are not a whole number of rows of 64"
    );
    let e = dequantize(GgmlType::Q8_0, &[0; 33], 32).unwrap_err();
    assert_eq!(e.to_string(), "32 Q8_0 values take 34 bytes, got 33");
    assert!(quantize(GgmlType::Q8_0, &[], 0).unwrap().is_empty());
    assert_eq!(quantize(GgmlType::Q5_0, &x, 32).unwrap().len(), 3 * 22);
}

#[test]
fn missing_tensor() {
    let bytes = small_file();
    let f = GgufFile::parse(&bytes).unwrap();
    let e = f.tensor_f32(&bytes, "nope").unwrap_err();
    assert_eq!(e.to_string(), "no tensor named `nope`");
    let t = f.tensor("v").unwrap();
    let e = f.tensor_bytes(&bytes[..200], t).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tensor `v` needs 16 bytes at offset 256, only 0 remaining"
    );
}

// =============================================================================================
// Streamed writes

/// `burnish_file()` written as a stream: every other tensor only declared (its data given to
/// the stream later, in two pieces), the rest added with their data. The file is byte for byte
/// the golden one; too much data, data past the last tensor, and a stream finished early are
/// errors naming the tensor, and an unfinished stream leaves no file behind.
#[test]
fn a_streamed_file_is_the_golden_file_and_bad_streams_fail_cleanly() {
    let golden = read_fixture("burnish_written.gguf");
    let parsed = GgufFile::parse(&golden).unwrap();
    let data = |i: usize| {
        parsed
            .tensor_bytes(&golden, &parsed.tensors[i])
            .unwrap()
            .to_vec()
    };
    let source = burnish_file();
    let streamed = || {
        let mut w = GgufWriter::new();
        for (k, v) in source.metadata() {
            w.set(k, v.clone());
        }
        w.set_alignment(source.alignment());
        for (i, t) in parsed.tensors.iter().enumerate() {
            if i % 2 == 0 {
                let bytes = w.declare_tensor(&t.name, &t.shape, t.ty).unwrap();
                assert_eq!(bytes, t.n_bytes());
            } else {
                w.add_tensor(&t.name, &t.shape, t.ty, data(i)).unwrap();
            }
        }
        w
    };
    let dir = tempfile::tempdir().unwrap();

    let declared = streamed();
    let e = declared.to_bytes().unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::no_data", "{e}");
    let path = dir.path().join("streamed.gguf");
    let mut s = declared.stream(&path).unwrap();
    for i in (0..parsed.tensors.len()).step_by(2) {
        assert_eq!(s.next_tensor(), Some(parsed.tensors[i].name.as_str()));
        let d = data(i);
        let (a, b) = d.split_at(d.len() / 3);
        s.put(a).unwrap();
        s.put(b).unwrap();
    }
    assert_eq!(s.next_tensor(), None);
    let e = s.put(&[0]).unwrap_err();
    assert_eq!(code(&e), "burnish::gguf::stream", "{e}");
    assert!(e.to_string().contains("after the last of 9 tensors"), "{e}");
    s.finish().unwrap();
    assert!(std::fs::read(&path).unwrap() == golden);

    let path = dir.path().join("too-much.gguf");
    let mut s = streamed().stream(&path).unwrap();
    let mut d = data(0);
    d.push(0);
    let e = s.put(&d).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("`f32.odd`") && msg.contains("takes 60 bytes, 61"),
        "{msg}"
    );
    drop(s);
    assert!(!path.exists());

    let path = dir.path().join("short.gguf");
    let mut s = streamed().stream(&path).unwrap();
    s.put(&data(0)).unwrap();
    s.put(&data(2)[..10]).unwrap();
    let e = s.finish().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("ended in tensor `q8_0.weight` after 10 of its 204 bytes (tensor 3 of 9)"),
        "{msg}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "only streamed.gguf: {left:?}");
}
