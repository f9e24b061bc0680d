//! metrics.jsonl as CSV (one row per logged step, one per diagnostics check, one per FID), for
//! spreadsheets and pandas; metrics.jsonl stays the run's record.

use std::collections::BTreeSet;

/// Every number (and boolean, as 0/1) in `v`, nested objects flattened with `/` under
/// `prefix` (arrays are left out). TensorBoard scalars use the same names.
pub fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, f64)>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((prefix.to_string(), x));
            }
        }
        serde_json::Value::Bool(b) => out.push((prefix.to_string(), f64::from(*b))),
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}/{k}")
                };
                flatten(&key, v, out);
            }
        }
        _ => {}
    }
}

/// A CSV table of `rows` (each a list of named numbers): the columns are `step` and then
/// every name in any row, sorted; a missing value is an empty cell.
fn table(rows: &[(u64, Vec<(String, f64)>)]) -> String {
    let names: BTreeSet<&str> = rows
        .iter()
        .flat_map(|(_, r)| r.iter().map(|(k, _)| k.as_str()))
        .filter(|k| *k != "step")
        .collect();
    let mut out = String::from("step");
    for n in &names {
        out.push(',');
        out.push_str(n);
    }
    out.push('\n');
    for (step, r) in rows {
        out.push_str(&step.to_string());
        for n in &names {
            out.push(',');
            if let Some((_, v)) = r.iter().find(|(k, _)| k == n) {
                out.push_str(&v.to_string());
            }
        }
        out.push('\n');
    }
    out
}

/// The CSV tables of a metrics.jsonl.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsTables {
    /// A row per logged step (lines with a `d_loss`).
    pub steps: String,
    /// A row per diagnostics check (lines with `diagnostics`, its `report` flattened;
    /// per-label arrays are left out); None when there were none.
    pub diagnostics: Option<String>,
    /// A row per FID measurement (lines with `fid`); None when there were none.
    pub fid: Option<String>,
}

/// The tables of the lines of a metrics.jsonl.
pub fn metrics_csv(lines: &[serde_json::Value]) -> MetricsTables {
    let mut steps = Vec::new();
    let mut checks = Vec::new();
    let mut fids = Vec::new();
    for l in lines {
        let Some(step) = l.get("step").and_then(|s| s.as_u64()) else {
            continue;
        };
        if l.get("d_loss").is_some() {
            let mut r = Vec::new();
            flatten("", l, &mut r);
            steps.push((step, r));
        } else if let Some(d) = l.get("diagnostics") {
            let mut r = Vec::new();
            flatten("", d, &mut r);
            checks.push((step, r));
        } else if let Some(f) = l.get("fid") {
            let mut r = Vec::new();
            flatten("", f, &mut r);
            fids.push((step, r));
        }
    }
    MetricsTables {
        steps: table(&steps),
        diagnostics: (!checks.is_empty()).then(|| table(&checks)),
        fid: (!fids.is_empty()).then(|| table(&fids)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_checks_become_tables() {
        let lines: Vec<serde_json::Value> = [
            r#"{"step": 1, "d_loss": 1.5, "g_loss": 0.25, "gp": null}"#,
            r#"{"step": 2, "d_loss": 1.0, "g_loss": 0.5, "r1": 0.125}"#,
            r#"{"step": 2, "diagnostics": {"seconds": 2.5, "report": {"prdc": {"precision": 0.75}, "hits": [1, 2]}}}"#,
            r#"{"step": 2, "alarm": {"message": "x"}}"#,
            r#"{"step": 2, "fid": {"step": 2, "fid": 31.5, "kid": 0.25, "n_real": 8}}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap_or_default())
        .collect();
        let t = metrics_csv(&lines);
        assert_eq!(
            t.steps,
            "step,d_loss,g_loss,r1\n1,1.5,0.25,\n2,1,0.5,0.125\n"
        );
        assert_eq!(
            t.diagnostics.as_deref(),
            Some("step,report/prdc/precision,seconds\n2,0.75,2.5\n")
        );
        assert_eq!(
            t.fid.as_deref(),
            Some("step,fid,kid,n_real\n2,31.5,0.25,8\n")
        );
        let t = metrics_csv(&lines[..2]);
        assert_eq!((t.diagnostics, t.fid), (None, None));
    }
}
