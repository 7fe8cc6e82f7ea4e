//! Training FLOPs per token, by component, for the study's Llama shapes: what "charging the
//! base's compute" counts.
//!
//! Per token, training costs 3x the forward pass (the backward pass is 2x), and the forward
//! pass costs 2 FLOPs per multiply-add:
//!
//! ```text
//! non-embedding matmuls  6 x L x (d*(h*hd) + 2*d*(kv*hd) + (h*hd)*d + 3*d*f)
//! LM head                6 x d x V
//! attention              3 x L x 2 x 2 x n_ctx x h x hd   (QK^T and the weighted sum of V)
//! input embedding        0  (a row lookup: no matmul)
//! ```
//!
//! d hidden, f FFN width (gate, up, down), h query heads, kv key/value heads, hd head dim,
//! L layers, V vocabulary, n_ctx the training sequence length: the decoder computes the whole
//! n_ctx x n_ctx score matrix and masks it, so every token pays for n_ctx keys. Norms,
//! softmax, activations and the optimizer are not matmuls and are left out (a few percent).

use hyperclone_core::config::ModelConfig;
use serde_json::{json, Value};

/// The dimensions the count needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub vocab: usize,
}

impl Shape {
    pub fn of(c: &ModelConfig) -> Shape {
        Shape {
            hidden: c.hidden_size,
            ffn: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            layers: c.num_hidden_layers,
            vocab: c.vocab_size,
        }
    }
}

/// Training FLOPs per token, by component.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Flops {
    pub non_embedding: f64,
    pub head: f64,
    pub attention: f64,
}

impl Flops {
    pub fn total(&self) -> f64 {
        self.non_embedding + self.head + self.attention
    }

    pub fn to_json(&self) -> Value {
        json!({
            "non_embedding_matmuls": self.non_embedding,
            "lm_head": self.head,
            "attention": self.attention,
            "input_embedding": 0.0,
            "total": self.total(),
        })
    }
}

/// The matmul parameters of the decoder layers (attention projections and the gated MLP).
pub fn non_embedding_matmul_params(s: &Shape) -> f64 {
    let (d, f) = (s.hidden as f64, s.ffn as f64);
    let q = (s.heads * s.head_dim) as f64;
    let kv = (s.kv_heads * s.head_dim) as f64;
    s.layers as f64 * (d * q + 2.0 * d * kv + q * d + 3.0 * d * f)
}

pub fn training_flops_per_token(s: &Shape, seq: usize) -> Flops {
    let attn_width = (s.heads * s.head_dim) as f64;
    Flops {
        non_embedding: 6.0 * non_embedding_matmul_params(s),
        head: 6.0 * (s.hidden * s.vocab) as f64,
        attention: 3.0 * s.layers as f64 * 4.0 * seq as f64 * attn_width,
    }
}

/// The speedup charging the base: the random init's training FLOPs over the clone's plus
/// the base's, i.e. R F_large / (C F_large + B F_small) with R, C and B in tokens.
pub fn charged_speedup(
    random_tokens: f64,
    clone_tokens: f64,
    base_tokens: f64,
    small: &Flops,
    large: &Flops,
) -> f64 {
    random_tokens * large.total() / (clone_tokens * large.total() + base_tokens * small.total())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_shape_counted_by_hand() {
        // d 4, f 6, 2 heads of 2, 1 kv head, 1 layer, V 10, n_ctx 3.
        let s = Shape {
            hidden: 4,
            ffn: 6,
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
            layers: 1,
            vocab: 10,
        };
        // q 4x4 = 16, k and v 4x2 = 8 each, o 16, MLP 3 x 4 x 6 = 72: 120 parameters.
        assert_eq!(non_embedding_matmul_params(&s), 120.0);
        let f = training_flops_per_token(&s, 3);
        assert_eq!(f.non_embedding, 720.0);
        assert_eq!(f.head, 240.0, "6 x 4 x 10");
        // Forward: 2 x 3 keys x 4 query dims for QK^T, the same for AV = 48; training 3x.
        assert_eq!(f.attention, 144.0);
        assert_eq!(f.total(), 1104.0);
    }

    #[test]
    fn the_study_shapes() {
        // The paper-regime base (hidden 64, FFN 172, 2 heads of 32, 1 kv head, 4 layers,
        // V 4096) and its x2 clone (hidden 128, FFN 344, 4 heads, 1 kv head), n_ctx 128.
        let small = Shape {
            hidden: 64,
            ffn: 172,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            layers: 4,
            vocab: 4096,
        };
        let large = Shape {
            hidden: 128,
            ffn: 344,
            heads: 4,
            ..small
        };
        let (fs, fl) = (
            training_flops_per_token(&small, 128),
            training_flops_per_token(&large, 128),
        );
        // Small: 4 x (4096 + 2 x 2048 + 4096 + 33024) = 181,248 matmul parameters.
        assert_eq!(fs.non_embedding, 6.0 * 181_248.0);
        assert_eq!(fs.head, 6.0 * 262_144.0);
        assert_eq!(fs.attention, 12.0 * 4.0 * 128.0 * 64.0);
        assert_eq!(fs.total(), 3_053_568.0);
        // Large: 4 x (16384 + 2 x 4096 + 16384 + 132096) = 692,224.
        assert_eq!(fl.non_embedding, 6.0 * 692_224.0);
        assert_eq!(fl.total(), 8_085_504.0);
        // The old 2.05M-token budget against the 4.61M-token base, the clone there at
        // once: 2.048 / (4.608 x 3.05 / 8.09) = 1.18x (6N with embeddings said 1.74x).
        let x = charged_speedup(2.048e6, 0.0, 4.608e6, &fs, &fl);
        assert!((x - 2.048e6 * 8_085_504.0 / (4.608e6 * 3_053_568.0)).abs() < 1e-12);
        assert!((x - 1.1768).abs() < 1e-4, "{x}");
    }
}
