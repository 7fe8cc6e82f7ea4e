//! Tiny synthetic Llama checkpoints written byte by byte, so CLI tests need no Python.
use hyperclone_core::safetensors::{encode_header, HeaderEntry};
use hyperclone_core::DType;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct Tiny {
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
    pub dtype: DType,
    /// Split into this many shards with an index (1: a single model.safetensors).
    pub shards: usize,
}

impl Default for Tiny {
    fn default() -> Self {
        Tiny {
            heads: 4,
            kv_heads: 2,
            tied: false,
            dtype: DType::F32,
            shards: 1,
        }
    }
}

pub const HIDDEN: usize = 16;
pub const FFN: usize = 24;
pub const VOCAB: usize = 32;
pub const LAYERS: usize = 2;

impl Tiny {
    pub fn config(&self) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": LAYERS,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tied,
            "torch_dtype": self.dtype.torch_name(),
            "some_unknown_key": {"kept": [1, 2, 3]},
        })
    }

    /// (name, shape) of every tensor, in the order transformers saves them.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let hd = HIDDEN / self.heads;
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
            t.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * hd, HIDDEN],
            ));
            t.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * hd, HIDDEN],
            ));
            t.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * hd, HIDDEN],
            ));
            t.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![HIDDEN, self.heads * hd],
            ));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]));
        }
        t.push(("model.norm.weight".to_string(), vec![HIDDEN]));
        if !self.tied {
            t.push(("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]));
        }
        t
    }

    pub fn write(&self, dir: &Path) -> PathBuf {
        self.write_with(dir, &self.config(), &self.tensors())
    }

    /// Writes a folder with the given config and tensor list (tests edit either).
    pub fn write_with(
        &self,
        dir: &Path,
        config: &Value,
        tensors: &[(String, Vec<usize>)],
    ) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer.json"), b"{\"model\": \"stand-in\"}").unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            b"{\"do_sample\": false}",
        )
        .unwrap();
        let per_shard = tensors.len().div_ceil(self.shards);
        let groups: Vec<&[(String, Vec<usize>)]> = tensors.chunks(per_shard).collect();
        let mut weight_map = serde_json::Map::new();
        let mut seed = 1u64;
        for (k, group) in groups.iter().enumerate() {
            let file = if self.shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, groups.len())
            };
            let entries: Vec<HeaderEntry> = group
                .iter()
                .map(|(n, s)| HeaderEntry {
                    name: n.clone(),
                    dtype: self.dtype,
                    shape: s.clone(),
                })
                .collect();
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            let mut bytes = encode_header(&entries, &meta);
            for (name, shape) in group.iter() {
                let n: usize = shape.iter().product();
                let values: Vec<f64> = (0..n).map(|_| pseudo_normal(&mut seed) * 0.4).collect();
                let mut b = vec![0u8; n * self.dtype.size()];
                self.dtype.encode(&values, &mut b);
                bytes.extend_from_slice(&b);
                weight_map.insert(name.clone(), Value::String(file.clone()));
            }
            std::fs::write(dir.join(&file), bytes).unwrap();
        }
        if self.shards > 1 {
            let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
            std::fs::write(
                dir.join("model.safetensors.index.json"),
                serde_json::to_vec(&index).unwrap(),
            )
            .unwrap();
        }
        dir.to_path_buf()
    }
}

fn pseudo_normal(state: &mut u64) -> f64 {
    // Sum of 4 uniforms, centred: close enough to normal for test weights.
    let mut s = 0.0;
    for _ in 0..4 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s += (*state >> 11) as f64 / (1u64 << 53) as f64;
    }
    (s - 2.0) * (3.0f64).sqrt()
}

pub const TEXT: &str =
    "the cat sat on the mat and the dog sat on the log while the bird sang in the tree ";

/// A word-level tokenizer.json over TEXT's words, a tiny Llama config.json with that
/// vocabulary, and data/a.txt (train) + data/b.txt (held out) for training tests.
pub fn toy_corpus(dir: &Path) {
    let mut words: Vec<&str> = TEXT.split_whitespace().collect();
    words.sort();
    words.dedup();
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), json!(0));
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).into(), json!(i + 1));
    }
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": words.len() + 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/a.txt"), TEXT.repeat(40)).unwrap();
    std::fs::write(dir.join("data/b.txt"), TEXT.repeat(10)).unwrap();
}
