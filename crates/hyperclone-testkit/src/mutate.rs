//! Seeded mutations of a tiny Llama folder (safetensors bytes and header fields,
//! config.json fields, the shard index), shared by the library harness
//! (hyperclone-core/tests/mutation.rs) and the CLI harness (hyperclone/tests/mutation_cli.rs).

use hyperclone_core::safetensors::pt_header;
use hyperclone_core::DType;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

pub const HIDDEN: usize = 8;
pub const FFN: usize = 12;
pub const VOCAB: usize = 16;

pub fn config() -> Map<String, Value> {
    let v = json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
        "vocab_size": VOCAB, "max_position_embeddings": 32, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "torch_dtype": "float32"
    });
    let Value::Object(m) = v else { unreachable!() };
    m
}

pub fn tensors() -> Vec<(String, Vec<usize>)> {
    let hd = HIDDEN / 2;
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    let p = "model.layers.0";
    t.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
    t.push((format!("{p}.self_attn.q_proj.weight"), vec![2 * hd, HIDDEN]));
    t.push((format!("{p}.self_attn.k_proj.weight"), vec![hd, HIDDEN]));
    t.push((format!("{p}.self_attn.v_proj.weight"), vec![hd, HIDDEN]));
    t.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, 2 * hd]));
    t.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
    t.push((format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
    t.push((format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]));
    t.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]));
    t.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    t.push(("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]));
    t
}

/// One safetensors file of `tensors` with small deterministic values.
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
    let mut bytes = pt_header(
        tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
        DType::F32,
        &[],
    );
    let mut k = 0u32;
    for (_, s) in tensors {
        for _ in 0..s.iter().product::<usize>() {
            k += 1;
            let x = ((k * 37 % 101) as f32 - 50.0) / 100.0;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    bytes
}

/// The files of a SRC folder, by name.
pub type Files = BTreeMap<String, Vec<u8>>;

pub fn single() -> Files {
    let mut f = Files::new();
    f.insert("config.json".into(), serde_json::to_vec(&config()).unwrap());
    f.insert("model.safetensors".into(), safetensors_bytes(&tensors()));
    f
}

pub fn sharded() -> Files {
    let t = tensors();
    let (a, b) = t.split_at(6);
    let mut f = Files::new();
    f.insert("config.json".into(), serde_json::to_vec(&config()).unwrap());
    let mut wm = Map::new();
    for (name, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        f.insert(name.into(), safetensors_bytes(part));
        for (n, _) in part {
            wm.insert(n.clone(), json!(name));
        }
    }
    f.insert(
        "model.safetensors.index.json".into(),
        serde_json::to_vec(&json!({"metadata": {"total_size": 0}, "weight_map": wm})).unwrap(),
    );
    f
}

/// Values an attacker puts in a JSON field.
pub fn hostile(rng: &mut Rng) -> Value {
    let pick = rng.below(22);
    match pick {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1.5),
        3 => json!(32.0),
        4 => json!(u64::MAX),
        5 => json!((1u64 << 61) + 6),
        6 => json!(1u64 << 40),
        7 => json!((1u64 << 31) + 1),
        8 => json!("8"),
        9 => Value::Null,
        10 => json!(true),
        11 => json!([]),
        12 => json!([1, 2]),
        13 => json!({}),
        14 => json!(f64::MAX),
        15 => json!(i64::MIN),
        16 => json!(rng.below(40)),
        17 => json!(rng.below(40) + 1),
        18 => json!([rng.below(300), rng.below(300)]),
        19 => json!([u64::MAX, 1]),
        20 => json!("../../etc/passwd"),
        _ => json!(-0.0),
    }
}

/// Rewrites the JSON header of a safetensors file (keeping the data), padded to 8.
pub fn with_header(bytes: &[u8], edit: impl FnOnce(&mut Map<String, Value>)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut h);
    let mut json = serde_json::to_vec(&h).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// One mutation of a fixture; returns the fixture and a description.
pub fn mutate(rng: &mut Rng, case: usize) -> (Files, String) {
    let mut files = if rng.below(4) == 0 {
        sharded()
    } else {
        single()
    };
    let weight_names: Vec<String> = files
        .keys()
        .filter(|k| k.ends_with(".safetensors"))
        .cloned()
        .collect();
    let target = rng.pick(&weight_names).clone();
    let kind = case % 9;
    let what = match kind {
        // A random byte of the length prefix or the JSON header.
        0 => {
            let b = files.get_mut(&target).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let i = rng.below(8 + n);
            let v = rng.next() as u8;
            b[i] = v;
            format!("{target}: byte {i} = {v}")
        }
        // The header length moved a little (into the padding, into the data).
        1 => {
            let b = files.get_mut(&target).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as i64;
            let d = *rng.pick(&[-8i64, -7, -4, -3, -1, 1, 3, 4, 8, 1 << 20, -n, i64::MAX / 2]);
            let m = n.saturating_add(d).max(0) as u64;
            b[..8].copy_from_slice(&m.to_le_bytes());
            format!("{target}: header length {n} -> {m}")
        }
        // Truncated or extended.
        2 => {
            let b = files.get_mut(&target).unwrap();
            if rng.below(2) == 0 {
                let keep = rng.below(b.len());
                b.truncate(keep);
                format!("{target}: truncated to {keep}")
            } else {
                let extra = 1 + rng.below(16);
                b.extend(std::iter::repeat_n(0x41u8, extra));
                format!("{target}: {extra} bytes appended")
            }
        }
        // A header field of one tensor replaced by a hostile value.
        3 | 4 => {
            let b = files.get(&target).unwrap().clone();
            let mut desc = String::new();
            let value = hostile(rng);
            let field = *rng.pick(&["dtype", "shape", "data_offsets"]);
            let pick = rng.next();
            let out = with_header(&b, |h| {
                let names: Vec<String> =
                    h.keys().filter(|k| *k != "__metadata__").cloned().collect();
                let name = &names[pick as usize % names.len()];
                let v = if field == "dtype" && value.is_number() {
                    json!(
                        ["F32", "BF16", "F16", "F64", "I64", "U8", "F8_E4M3", ""]
                            [pick as usize % 8]
                    )
                } else {
                    value.clone()
                };
                desc = format!("{target}: `{name}`.{field} = {v}");
                h[name][field] = v;
            });
            files.insert(target.clone(), out);
            desc
        }
        // A tensor removed, duplicated under another name, or the metadata broken.
        5 => {
            let b = files.get(&target).unwrap().clone();
            let mut desc = String::new();
            let pick = rng.next();
            let out = with_header(&b, |h| {
                let names: Vec<String> =
                    h.keys().filter(|k| *k != "__metadata__").cloned().collect();
                let name = names[pick as usize % names.len()].clone();
                match pick % 3 {
                    0 => {
                        h.remove(&name);
                        desc = format!("{target}: `{name}` removed from the header");
                    }
                    1 => {
                        let e = h[&name].clone();
                        h.insert("model.layers.0.mlp.extra.weight".into(), e);
                        desc = format!("{target}: `{name}` entry duplicated");
                    }
                    _ => {
                        h.insert("__metadata__".into(), json!({"format": 1}));
                        desc = format!("{target}: non-string metadata");
                    }
                }
            });
            files.insert(target.clone(), out);
            desc
        }
        // A config.json field replaced by a hostile value, or removed.
        6 | 7 => {
            let mut cfg: Map<String, Value> =
                serde_json::from_slice(&files["config.json"]).unwrap();
            let key = *rng.pick(&[
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "num_hidden_layers",
                "vocab_size",
                "max_position_embeddings",
                "head_dim",
                "tie_word_embeddings",
                "model_type",
                "attention_bias",
                "torch_dtype",
            ]);
            let v = hostile(rng);
            let desc = if rng.below(8) == 0 {
                cfg.remove(key);
                format!("config.json: `{key}` removed")
            } else {
                let d = format!("config.json: `{key}` = {v}");
                cfg.insert(key.into(), v);
                d
            };
            files.insert("config.json".into(), serde_json::to_vec(&cfg).unwrap());
            desc
        }
        // The index (or, unsharded, the config) as bytes: a random byte or a hostile map entry.
        _ => {
            let name = if files.contains_key("model.safetensors.index.json") {
                "model.safetensors.index.json"
            } else {
                "config.json"
            };
            let b = files.get_mut(name).unwrap();
            if rng.below(2) == 0 {
                let i = rng.below(b.len());
                let v = rng.next() as u8;
                b[i] = v;
                format!("{name}: byte {i} = {v}")
            } else {
                let mut v: Map<String, Value> = serde_json::from_slice(b).unwrap();
                let entry = hostile(rng);
                if let Some(Value::Object(wm)) = v.get_mut("weight_map") {
                    let k = wm.keys().nth(rng.below(wm.len())).unwrap().clone();
                    wm.insert(k, entry.clone());
                } else {
                    v.insert("weight_map".into(), entry.clone());
                }
                *b = serde_json::to_vec(&v).unwrap();
                format!("{name}: weight_map entry = {entry}")
            }
        }
    };
    (files, what)
}

/// What a round-two case (issue 18) must end in, beyond "no panic, SRC untouched".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Refused while opening SRC, the message naming this text.
    Refused(&'static str),
    /// Opened, and what is read is the single `model.safetensors` (transformers' choice).
    ReadsSingleFile,
    /// Opened and grown.
    Accepted,
}

/// Renames one tensor of a safetensors file (same entry).
fn rename_tensor(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    with_header(bytes, |h| {
        let e = h.remove(from).expect("tensor present");
        h.insert(to.into(), e);
    })
}

/// The data bytes of one tensor of a safetensors file, for copying values around.
fn tensor_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let o = &h[name]["data_offsets"];
    8 + n + o[0].as_u64().unwrap() as usize..8 + n + o[1].as_u64().unwrap() as usize
}

fn edit_config(files: &mut Files, edit: impl FnOnce(&mut Map<String, Value>)) {
    let mut cfg: Map<String, Value> = serde_json::from_slice(&files["config.json"]).unwrap();
    edit(&mut cfg);
    files.insert("config.json".into(), serde_json::to_vec(&cfg).unwrap());
}

/// The classes the second campaign found (issue 18), as seeded mutations with their
/// expected outcome: non-canonical layer indices, a tied config beside a stored head, a
/// single file beside an index, `layer_types`, empty or hostile weight maps.
pub fn mutate_round_two(rng: &mut Rng, case: usize) -> (Files, String, Expect) {
    let mut files = single();
    match case % 5 {
        // Tensor names: a layer index that is not how transformers writes it.
        0 => {
            let index = *rng.pick(&[
                "00",
                "01",
                "000",
                "+0",
                "-0",
                " 0",
                "0 ",
                "0_",
                "0x0",
                "٠",
                "0\u{0}",
                "18446744073709551616",
                "",
                "0.",
                "１",
            ]);
            let names: Vec<String> = tensors()
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| n.starts_with("model.layers.0."))
                .collect();
            let from = rng.pick(&names).clone();
            let to = from.replacen("layers.0.", &format!("layers.{index}."), 1);
            let b = files["model.safetensors"].clone();
            // Beside the canonical tensor (a duplicate), or instead of it (a hole).
            let out = if rng.below(2) == 0 {
                with_header(&b, |h| {
                    let e = h[&from].clone();
                    h.insert(to.clone(), e);
                })
            } else {
                rename_tensor(&b, &from, &to)
            };
            files.insert("model.safetensors".into(), out);
            (
                files,
                format!("`{from}` -> `{to}`"),
                Expect::Refused("model.layers."),
            )
        }
        // A tied config beside a stored head: refused unless the head equals the embedding.
        1 => {
            edit_config(&mut files, |c| {
                c.insert("tie_word_embeddings".into(), json!(true));
            });
            let equal = rng.below(2) == 0;
            if equal {
                let b = files.get_mut("model.safetensors").unwrap();
                let (e, h) = (
                    tensor_range(b, "model.embed_tokens.weight"),
                    tensor_range(b, "lm_head.weight"),
                );
                let emb = b[e].to_vec();
                b[h].copy_from_slice(&emb);
                (
                    files,
                    "tied, stored head = embedding".into(),
                    Expect::Accepted,
                )
            } else {
                let b = files.get_mut("model.safetensors").unwrap();
                let h = tensor_range(b, "lm_head.weight");
                let i = h.start + 4 * rng.below(h.len() / 4);
                // One element changed (or made -0.0 / NaN): still another head.
                let v = *rng.pick(&[1.5f32, f32::NAN, 1e-30]);
                b[i..i + 4].copy_from_slice(&v.to_le_bytes());
                let d = format!("tied, stored head differs at byte {i} ({v})");
                (files, d, Expect::Refused("tie_word_embeddings"))
            }
        }
        // Both a single file and an index: the single file is read, whatever the index says.
        2 => {
            let shards = sharded();
            for (k, v) in shards {
                if k != "config.json" {
                    files.insert(k, v);
                }
            }
            let what = match rng.below(4) {
                0 => "a valid index and its shards".to_string(),
                1 => {
                    files.insert(
                        "model.safetensors.index.json".into(),
                        br#"{"weight_map": {}}"#.to_vec(),
                    );
                    "an index with an empty weight_map".to_string()
                }
                2 => {
                    let v = hostile(rng);
                    let text = serde_json::to_vec(&json!({ "weight_map": v })).unwrap();
                    files.insert("model.safetensors.index.json".into(), text);
                    format!("an index with weight_map = {v}")
                }
                _ => {
                    files.remove("model-00002-of-00002.safetensors");
                    "an index naming a missing shard".to_string()
                }
            };
            (
                files,
                format!("model.safetensors beside {what}"),
                Expect::ReadsSingleFile,
            )
        }
        // layer_types: wrong length, unknown or non-string entries, not a list.
        3 => {
            let v = match rng.below(8) {
                0 => json!([]),
                1 => json!(["full_attention", "full_attention"]),
                2 => json!(["bogus"]),
                3 => json!([null]),
                4 => json!([1]),
                5 => json!("full_attention"),
                6 => json!(["chunked_attention"]),
                _ => json!({"0": "full_attention"}),
            };
            edit_config(&mut files, |c| {
                c.insert("layer_types".into(), v.clone());
            });
            (
                files,
                format!("layer_types = {v}"),
                Expect::Refused("layer_types"),
            )
        }
        // The index alone, with an empty or missing weight_map.
        _ => {
            let mut files = sharded();
            let text = *rng.pick(&[
                r#"{"weight_map": {}}"#,
                r#"{"metadata": {}, "weight_map": {}}"#,
                r#"{"metadata": {"total_size": 0}}"#,
                r#"{}"#,
            ]);
            files.insert(
                "model.safetensors.index.json".into(),
                text.as_bytes().to_vec(),
            );
            (
                files,
                format!("index = {text}"),
                Expect::Refused("weight_map"),
            )
        }
    }
}

/// How many seeded cases a harness runs: `var` from the environment, else `default`.
pub fn case_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes one case's files into `root/case{case}/src` and returns that folder.
pub fn write_case(root: &std::path::Path, case: usize, files: &Files) -> std::path::PathBuf {
    let src = root.join(format!("case{case}")).join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (name, bytes) in files {
        std::fs::write(src.join(name), bytes).unwrap();
    }
    src
}
