//! How a model directory's weights are split into files, as transformers' `save_pretrained`
//! splits them (huggingface_hub's `split_state_dict_into_shards_factory`): tensors in parameter
//! order fill a shard until the next would take it past `max_shard_size`; a tensor larger than
//! the limit gets a shard of its own. One shard is `model.safetensors`; several are
//! `model-00001-of-0000N.safetensors`… with `model.safetensors.index.json`
//! (`{"metadata": {"total_parameters", "total_size"}, "weight_map": {tensor: file}}`, keys
//! sorted, two-space indent, as transformers writes it).

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `max_shard_size:` — digits and a unit, KB, MB, GB or TB (powers of 1000), as
/// huggingface_hub's `parse_size_to_int` reads them: `"5GB"`, `"500MB"`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardSize {
    text: String,
    bytes: u64,
}

/// transformers' default (`save_pretrained(max_shard_size="50GB")`).
pub const DEFAULT_SHARD_BYTES: u64 = 50_000_000_000;

impl ShardSize {
    pub fn parse(text: &str) -> Result<ShardSize, String> {
        let t = text.trim();
        let split = t.len().saturating_sub(2);
        let (value, unit) = (t[..split].trim(), t.get(split..).unwrap_or(""));
        let multiplier: f64 = match unit.to_ascii_uppercase().as_str() {
            "KB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "TB" => 1e12,
            _ => {
                return Err(format!(
                    "`{text}` has no unit KB, MB, GB or TB (like \"5GB\")"
                ));
            }
        };
        let v: f64 = value
            .parse()
            .map_err(|_| format!("`{text}`: `{value}` is not a number"))?;
        let bytes = v * multiplier;
        if !(bytes >= 1.0 && bytes.is_finite()) {
            return Err(format!("`{text}` is not a positive size"));
        }
        Ok(ShardSize {
            text: text.to_owned(),
            bytes: bytes as u64,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl fmt::Display for ShardSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for ShardSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ShardSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ShardSize::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for ShardSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ShardSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*([KMGTkmgt][Bb])\\s*$",
            "description": "A size with a unit, KB, MB, GB or TB (powers of 1000): \"5GB\"",
        })
    }
}

/// The shards of tensors of `sizes` bytes (in order) under a limit of `max` bytes: each shard
/// the indices of its tensors.
pub fn split(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let (mut current, mut current_size) = (Vec::new(), 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The file name of shard `k` (from 0) of `n`.
pub fn file_name(k: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_huggingface_hub_does() {
        assert_eq!(ShardSize::parse("5GB").unwrap().bytes(), 5_000_000_000);
        assert_eq!(ShardSize::parse(" 1.5mb ").unwrap().bytes(), 1_500_000);
        assert_eq!(ShardSize::parse("100KB").unwrap().bytes(), 100_000);
        assert!(ShardSize::parse("5GiB").unwrap_err().contains("no unit"));
        assert!(
            ShardSize::parse("xGB")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(
            ShardSize::parse("0GB")
                .unwrap_err()
                .contains("not a positive size")
        );
    }

    #[test]
    fn splitting_follows_the_factorys_example() {
        // huggingface_hub's docstring: a limit of 10 and tensors [6, 6, 2, 6, 2, 2] give
        // [6], [6+2], [6+2+2].
        assert_eq!(
            split(&[6, 6, 2, 6, 2, 2], 10),
            vec![vec![0], vec![1, 2], vec![3, 4, 5]]
        );
        // A tensor over the limit alone, the shard being filled goes on after it.
        assert_eq!(split(&[3, 12, 3], 10), vec![vec![1], vec![0, 2]]);
        assert_eq!(file_name(0, 1), "model.safetensors");
        assert_eq!(file_name(1, 3), "model-00002-of-00003.safetensors");
    }
}
