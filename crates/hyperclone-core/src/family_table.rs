//! The family tables of README.md (compact) and docs/families.md (detailed), rendered from the
//! family records, so the docs cannot drift from what growth and the decoder read. The
//! committed files hold the tables between [`BEGIN`] and [`END`]; a test compares them with
//! the rendering (`HYPERCLONE_UPDATE_DOCS=1 cargo test -p hyperclone-core families_table`
//! rewrites them).

use crate::family::{Family, HeadCounts, LayerSliding, TiedGrowth, FAMILIES};
use crate::wiring::{AttnLayout, BlockLayout, MlpLayout};

pub const BEGIN: &str = "<!-- families:begin -->";
pub const END: &str = "<!-- families:end -->";

/// One line per family: model_type, class, what growth keeps exact, kept tie, short notes.
pub fn compact_table() -> String {
    let mut out = String::from(
        "| `model_type` | transformers class | grows exactly | `--keep-tied` | notes |\n|---|---|---|---|---|\n",
    );
    for f in FAMILIES {
        let tie = match f.tied_growth {
            TiedGrowth::Exact { .. } => "yes",
            TiedGrowth::Refused(_) => "no",
        };
        out += &row(&[f.model_type, f.architecture, &growth(f), tie, f.notes]);
    }
    out
}

/// The detailed table: the compact one's columns, the decoder's wiring, the reason a kept tie
/// is refused, and the long notes.
pub fn detailed_table() -> String {
    let mut out = String::from(
        "| `model_type` | transformers class | layout (Rust decoder) | grows exactly | `--keep-tied` | notes |\n\
         |---|---|---|---|---|---|\n",
    );
    for f in FAMILIES {
        let tie = match f.tied_growth {
            TiedGrowth::Exact { .. } if f.embedding_scaled_by_sqrt_hidden => {
                "yes (stream carried at 1/sqrt(n))".to_string()
            }
            TiedGrowth::Exact { .. } => "yes (stream carried at 1/n)".to_string(),
            TiedGrowth::Refused(why) => format!("no: {why}"),
        };
        out += &row(&[
            f.model_type,
            f.architecture,
            &layout(f),
            &growth(f),
            &tie,
            f.details,
        ]);
    }
    out
}

/// A table row; `|` inside a cell is escaped (GitHub splits cells on it, even in code spans).
fn row(cells: &[&str]) -> String {
    let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    format!("| {} |\n", cells.join(" | "))
}

/// What a clone can change while computing the source's function exactly.
fn growth(f: &Family) -> String {
    // Depth growth moves layers to new indices: refused where the family picks a layer's kind
    // by its index and config.json does not list it.
    let mut lists: Vec<String> = match f.layer_sliding {
        LayerSliding::Alternating | LayerSliding::Periodic { .. } => {
            vec!["`layer_types`".into()]
        }
        LayerSliding::FromMaxWindowLayers
        | LayerSliding::EvenBelowMaxWindowLayers
        | LayerSliding::NoRopeLayersIfEnabled => vec!["`layer_types` when sliding".into()],
        LayerSliding::Never | LayerSliding::Every | LayerSliding::EveryIfEnabled => vec![],
    };
    lists.extend(f.per_layer_keys.iter().map(|k| format!("`{k}`")));
    let depth = if lists.is_empty() {
        "depth".to_string()
    } else {
        format!("depth (with {})", lists.join(", "))
    };
    let heads = match f.head_counts {
        HeadCounts::Any => "heads: any count",
        HeadCounts::DividingHidden => "heads: counts dividing the width",
        HeadCounts::Refused(_) => "heads: x n only",
    };
    let experts = match f.moe {
        Some(m) if m.shared_ffn.is_some() => "; experts and top-k kept, shared expert x m",
        Some(_) => "; experts and top-k kept",
        None => "",
    };
    format!("width, FFN, {depth}; {heads}{experts}")
}

/// The decoder's view of a block, from the record's wiring.
fn layout(f: &Family) -> String {
    let w = &f.wiring;
    let block = |b: BlockLayout| match b {
        BlockLayout::Sequential {
            pre_attn,
            post_attn,
            ..
        } => match (pre_attn.is_some(), post_attn.is_some()) {
            (true, true) => "pre- and post-norms",
            (true, false) => "pre-norm",
            (false, true) => "post-norms",
            (false, false) => "no norms",
        },
        BlockLayout::Parallel { .. } => "parallel attention and MLP",
        BlockLayout::PostNorm { .. } => "post-LN",
    };
    let mut parts = vec![format!("{}, {}", w.norm.name(), block(w.block))];
    if let Some((flag, other)) = w.block_switch {
        parts.push(format!(
            "{} with `{}: {}`",
            block(other),
            flag.key,
            !flag.default
        ));
    }
    parts.push(
        match w.attn {
            AttnLayout::Separate { .. } => "q/k/v/o",
            AttnLayout::Concat { .. } => "fused [q | k | v]",
            AttnLayout::PerHead { .. } => "fused qkv per head",
            AttnLayout::Conv1d { .. } => "Conv1D [q | k | v]",
        }
        .to_string(),
    );
    if w.qk_norm.is_some() {
        parts.push("q/k norms".into());
    }
    parts.push(
        match w.mlp {
            MlpLayout::Gated { .. } => "gated MLP",
            MlpLayout::GatedFused { .. } => "fused [gate | up] MLP",
            MlpLayout::Plain { .. } | MlpLayout::PlainConv1d { .. } => "plain MLP",
            MlpLayout::Moe {
                shared: Some(_), ..
            } => "MoE with a shared expert",
            MlpLayout::Moe { .. } => "MoE",
        }
        .to_string(),
    );
    if w.positions.is_some() {
        parts.push("learned positions".into());
    }
    parts.join("; ")
}

/// `doc` with the text between the markers replaced by `table`; None without both markers.
pub fn splice(doc: &str, table: &str) -> Option<String> {
    let start = doc.find(BEGIN)? + BEGIN.len();
    let end = start + doc[start..].find(END)?;
    Some(format!("{}\n{}{}", &doc[..start], table, &doc[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// README.md and docs/families.md hold the tables rendered from the records.
    #[test]
    fn families_table_matches_docs() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let update = std::env::var_os("HYPERCLONE_UPDATE_DOCS").is_some_and(|v| v == "1");
        for (file, table) in [
            ("README.md", compact_table()),
            ("docs/families.md", detailed_table()),
        ] {
            let path = root.join(file);
            let doc = std::fs::read_to_string(&path).unwrap();
            let want = splice(&doc, &table)
                .unwrap_or_else(|| panic!("{file} lacks the {BEGIN} / {END} markers"));
            if update {
                std::fs::write(&path, &want).unwrap();
            } else {
                assert!(
                    doc == want,
                    "{file}'s family table differs from the one rendered from the family records; \
                     regenerate it with `HYPERCLONE_UPDATE_DOCS=1 cargo test -p hyperclone-core families_table`"
                );
            }
        }
    }

    #[test]
    fn splice_replaces_only_between_the_markers() {
        let doc = format!("a\n{BEGIN}\nold\n{END}\nb\n");
        assert_eq!(
            splice(&doc, "new\n").unwrap(),
            format!("a\n{BEGIN}\nnew\n{END}\nb\n")
        );
        assert_eq!(splice("a\nno markers\n", "t"), None);
        assert_eq!(splice(&format!("{END} {BEGIN}"), "t"), None);
    }

    #[test]
    fn every_family_has_a_row_with_its_class() {
        let compact = compact_table();
        let detailed = detailed_table();
        for f in FAMILIES {
            assert!(
                f.architecture.ends_with("ForCausalLM") || f.architecture.ends_with("LMHeadModel"),
                "{}: {}",
                f.model_type,
                f.architecture
            );
            assert!(!f.details.is_empty(), "{}", f.model_type);
            let line = format!("| {} | {} |", f.model_type, f.architecture);
            assert!(
                compact.contains(&line) && detailed.contains(&line),
                "{line}"
            );
        }
        // One line per family plus the header and the rule.
        assert_eq!(compact.lines().count(), FAMILIES.len() + 2);
        assert_eq!(detailed.lines().count(), FAMILIES.len() + 2);
    }
}
