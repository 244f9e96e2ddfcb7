//! KV-cached decoding: what generation runs on a model.
//!
//! A batch of prompts of different lengths is left-padded to one length `t`, so every row's
//! next token goes to the same cache position. [`CausalLm::prefill`] runs the prompts through
//! the model once, as a packed batch in which each pad is a document of its own and the prompt
//! is one document: the prompt's tokens attend only to each other with positions from 0 —
//! transformers' `cumsum(attention_mask) − 1` — so a padded row's logits are its unpadded
//! logits, and on flex the prefill is the training forward's fused attention. Every layer's
//! rotated keys and values go into a [`KvCache`] allocated once for the prompt plus the new
//! tokens. [`CausalLm::decode`] then feeds one token per row: the new position's query attends
//! to the row's cached keys from its first real token on ([`fused::decode_attention`]), and its
//! key and value are written into the cache in place.
//!
//! The rotary angles are computed once for the whole length ([`RopeTable`]); each step only
//! gathers its rows' positions.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::fused;
use super::llama::{AttentionMask, CausalLm, Documents, Rope, RopeTable};

/// One layer's keys and values, `[batch, kv_heads, capacity, head_dim]`.
struct LayerCache<B: Backend> {
    k: Option<Tensor<B, 4>>,
    v: Option<Tensor<B, 4>>,
}

impl<B: Backend> LayerCache<B> {
    /// Write `k`, `v` (`[batch, kv_heads, n, head_dim]`) at positions `at..at + n`, in place
    /// on flex when nothing else holds the cache ([`fused::write_positions`]).
    fn write(&mut self, at: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        if let (Some(ck), Some(cv)) = (self.k.take(), self.v.take()) {
            self.k = Some(fused::write_positions(ck, at, k));
            self.v = Some(fused::write_positions(cv, at, v));
        }
    }

    fn get(&self) -> (&Tensor<B, 4>, &Tensor<B, 4>) {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => (k, v),
            _ => unreachable!("a layer cache is refilled by every write"),
        }
    }
}

/// The keys and values of a batch being decoded, every layer, for up to `capacity` positions.
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    /// Positions filled, the same for every row.
    len: usize,
    capacity: usize,
    /// Per row, its first real position (the count of its left pads).
    firsts: Vec<usize>,
    rope: RopeTable,
}

impl<B: Backend> KvCache<B> {
    /// Positions filled so far (prompt length included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of keys and values one position of one row takes (f32, every layer).
    pub fn bytes_per_token(cfg: &super::ModelConfig) -> usize {
        2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    }
}

impl<B: Backend> CausalLm<B> {
    /// Run left-padded prompts through the model and keep their keys and values for
    /// `max_new` more tokens: the logits of each row's last position and the cache.
    ///
    /// `pads[row]` is the count of pad tokens at the start of the row (its ids there are not
    /// read for anything the row's real tokens see).
    ///
    /// # Shapes
    /// - ids: `[batch, t]` with `pads[row] < t`
    /// - output: logits `[batch, vocab]`
    ///
    /// # Panics
    /// When `pads` has not one entry per row or a row is all padding.
    pub fn prefill(
        &self,
        ids: Tensor<B, 2, Int>,
        pads: &[usize],
        max_new: usize,
    ) -> (Tensor<B, 2>, KvCache<B>) {
        let device = ids.device();
        let [b, t] = ids.dims();
        assert!(
            pads.len() == b && pads.iter().all(|&p| p < t),
            "{} pad counts for a batch of {b} rows of {t}",
            pads.len()
        );
        let cfg = &self.config;
        let capacity = t + max_new;
        // Each pad its own document (it sees only itself), then the prompt.
        let starts: Vec<Vec<usize>> = pads.iter().map(|&p| (1..=p).collect()).collect();
        let rows: Vec<&[usize]> = starts.iter().map(Vec::as_slice).collect();
        let docs = Documents::new(&rows, t);
        let groups = cfg.num_heads / cfg.num_kv_heads;
        let mask = AttentionMask::documents(docs.clone(), groups, &device);
        let table = RopeTable::new(cfg, capacity);
        let rope = Rope::from_table(&table, b, &docs.positions(), &device);
        let empty = || {
            Some(Tensor::<B, 4>::zeros(
                [b, cfg.num_kv_heads, capacity, cfg.head_dim],
                &device,
            ))
        };
        let mut layers: Vec<LayerCache<B>> = (0..cfg.num_layers)
            .map(|_| LayerCache {
                k: empty(),
                v: empty(),
            })
            .collect();
        let mut x = burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), ids); // [b, t, hidden]
        for (layer, cache) in self.model.layers.iter().zip(&mut layers) {
            x = layer.around(x, |h| {
                let (q, k, v) = layer.self_attn.project(h, &rope);
                cache.write(0, k.clone(), v.clone());
                layer
                    .self_attn
                    .output(fused::causal_attention(q, k, v, &mask), b, t)
            });
        }
        let last = self.model.norm.forward(x.narrow(1, t - 1, 1)); // [b, 1, hidden]
        let cache = KvCache {
            layers,
            len: t,
            capacity,
            firsts: pads.to_vec(),
            rope: table,
        };
        (self.head(last).reshape([b, cfg.vocab_size]), cache)
    }

    /// Feed one token per row at the next position: the logits there, the cache one longer.
    ///
    /// # Shapes
    /// - ids: `[batch, 1]`
    /// - output: `[batch, vocab]`
    ///
    /// # Panics
    /// When the cache is full or `ids` has not the cache's rows.
    pub fn decode(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let device = ids.device();
        let [b, _] = ids.dims();
        assert!(
            cache.len < cache.capacity && b == cache.firsts.len(),
            "decoding {b} rows at position {} of a cache of {} rows and {} positions",
            cache.len,
            cache.firsts.len(),
            cache.capacity
        );
        let at = cache.len;
        let positions: Vec<usize> = cache.firsts.iter().map(|&f| at - f).collect();
        let rope = Rope::from_table(&cache.rope, b, &positions, &device);
        let mut x = burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), ids); // [b, 1, hidden]
        for (layer, lc) in self.model.layers.iter().zip(&mut cache.layers) {
            x = layer.around(x, |h| {
                let (q, k, v) = layer.self_attn.project(h, &rope); // q [b, nkv, groups, hd]
                lc.write(at, k, v);
                let (ck, cv) = lc.get();
                let out = fused::decode_attention(q, ck, cv, at + 1, &cache.firsts);
                layer.self_attn.output(out, b, 1)
            });
        }
        cache.len += 1;
        let last = self.model.norm.forward(x); // [b, 1, hidden]
        self.head(last).reshape([b, self.config.vocab_size])
    }
}
