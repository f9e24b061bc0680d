//! Condition lists and label names as the CLI reads them.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// Parse one label list / class reference into a condition vector.
pub(crate) fn parse_condition(
    names: &[String],
    items: &[String],
    one_hot: bool,
) -> Result<Vec<f32>> {
    let mut v = vec![0.0f32; names.len()];
    for it in items {
        let it = it.trim();
        let idx = names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(it))
            .or_else(|| it.parse::<usize>().ok().filter(|&i| i < names.len()));
        match idx {
            Some(i) if v[i] > 0.5 => bail!("label `{it}` is given twice"),
            Some(i) => v[i] = 1.0,
            None => bail!("unknown label `{it}` (known: {})", names.join(", ")),
        }
    }
    // i-CLEVR (24 object labels) scenes hold 1 to 3 objects.
    if names.len() == ganscope::data::iclevr::OBJECT_NAMES.len()
        && names
            .iter()
            .zip(ganscope::data::iclevr::OBJECT_NAMES)
            .all(|(a, b)| a == b)
        && !(1..=3).contains(&items.len())
    {
        bail!(
            "an i-CLEVR condition holds 1 to 3 objects, this one {}",
            items.len()
        );
    }
    if one_hot && items.len() != 1 {
        bail!(
            "this model takes exactly one class per condition, got {}",
            items.len()
        );
    }
    Ok(v)
}

/// A condition list file: a JSON list whose entries are label lists (i-CLEVR test.json
/// style) or single class names / ids; an empty list is an error.
pub(crate) fn read_condition_file(p: &Path) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list", p.display()))?;
    if list.is_empty() {
        bail!("{}: the list holds no conditions", p.display());
    }
    Ok(list
        .iter()
        .map(|item| match item {
            serde_json::Value::Array(xs) => xs.iter().map(json_label).collect(),
            x => vec![json_label(x)],
        })
        .collect())
}

pub(crate) fn json_label(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
