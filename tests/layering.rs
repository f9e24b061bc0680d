//! The engine's layers, bottom to top, each using only the ones below it (issue #18, "layers
//! of the house"):
//!
//! base (error, rng, device, images, checkpoint, params, grad, config, export)
//! -> kernels -> nn -> optim -> model -> data -> eval -> diagnostics -> train -> explore
//! -> app / cli / bench / fuzz.
//!
//! Reads every source file under `src/` and fails on a `crate::<module>` path (in a `use` or
//! inline) that names a module above the file's own. Modules of the same layer (the base ones,
//! the top ones) may use each other. Comments and the unit tests are not checked (those at the
//! end of a file, `#[cfg(test)] mod tests { .. }`, and those in a file of their own,
//! `foo/tests.rs` behind `#[cfg(test)] mod tests;`): a kernel's test may drive a whole model.
//! Imports that break the order today are listed in [`EXCEPTIONS`]; an exception that is no
//! longer needed fails the test too, so the list only shrinks.

#![expect(clippy::unwrap_used, reason = "tests may unwrap")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Every top-level module of the crate (and the root's own items) with its layer.
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("Error", 0),
    ("Result", 0),
    ("rng", 0),
    ("device", 0),
    ("images", 0),
    ("checkpoint", 0),
    ("params", 0),
    ("grad", 0),
    ("config", 0),
    ("export", 0),
    ("tune_allocator", 0),
    ("elementwise_threads_env", 0),
    // Runs a closure on a rayon worker (lib.rs); uses no module of the crate.
    ("on_pool_worker", 0),
    ("kernels", 1),
    ("nn", 2),
    ("optim", 3),
    ("model", 4),
    ("data", 5),
    ("eval", 6),
    ("diagnostics", 7),
    ("train", 8),
    ("explore", 9),
    ("app", 10),
    ("cli", 10),
    ("bench", 10),
    ("fuzz", 10),
];

/// Known imports against the order: (importing module, imported module, why it stays).
/// Empty since session 15: the config sections of the monitor, diagnostics, augmentation and
/// EMA are defined in `config`, the step statistics in `diagnostics`, and the auxiliary loss
/// in `nn`; an exception added here must say why it cannot be avoided.
const EXCEPTIONS: &[(&str, &str, &str)] = &[];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to; `None` for the crate roots.
fn owner(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// A unit-test module in a file of its own (`conv/tests.rs` for `#[cfg(test)] mod tests;` in
/// `conv.rs`).
fn is_test_file(file: &Path) -> bool {
    file.file_name().is_some_and(|n| n == "tests.rs")
}

/// The file's code without its unit tests and without comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules named right after `crate::`, including each name of a `crate::{a, b::c}` group.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        // Not the tail of another path (`ganscope_crate::`).
        if code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split at commas outside nested braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {} source files", files.len());

    let mut violations = Vec::new();
    let mut used_exceptions = BTreeSet::new();
    let mut unknown = BTreeSet::new();
    for file in &files {
        let Some(from) = owner(&src, file) else {
            continue;
        };
        if is_test_file(file) {
            continue;
        }
        let Some(from_layer) = layer(&from) else {
            unknown.insert(format!("{from} (module of {})", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for to in crate_paths(&code(&text)) {
            if to == from {
                continue;
            }
            let Some(to_layer) = layer(&to) else {
                unknown.insert(format!("crate::{to} (used in {})", file.display()));
                continue;
            };
            // Same layer: peers (base modules, top modules) may use each other.
            if to_layer <= from_layer {
                continue;
            }
            if EXCEPTIONS.iter().any(|(f, t, _)| *f == from && *t == to) {
                used_exceptions.insert((from.clone(), to.clone()));
                continue;
            }
            let rel = file.strip_prefix(&src).unwrap().display().to_string();
            violations.push(format!(
                "src/{rel}: {from} (layer {from_layer}) uses crate::{to} (layer {to_layer})"
            ));
        }
    }
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS in tests/layering.rs: {unknown:#?}"
    );
    assert!(
        violations.is_empty(),
        "imports of a higher layer:\n{}",
        violations.join("\n")
    );
    let stale: Vec<_> = EXCEPTIONS
        .iter()
        .filter(|(f, t, _)| !used_exceptions.contains(&(f.to_string(), t.to_string())))
        .collect();
    assert!(
        stale.is_empty(),
        "exceptions no longer needed (remove them from EXCEPTIONS): {stale:?}"
    );
}

/// The scanner itself: plain and grouped paths, comments and unit tests skipped.
#[test]
fn the_scanner_finds_plain_and_grouped_paths() {
    let text = "use crate::nn::{Linear, LayerOpts};\n\
                use crate::{model::Generator, optim::{adam::Adam}, self};\n\
                // crate::train in a comment\n\
                let x = crate::kernels::ops::relu(&y); /// crate::app\n\
                #[cfg(test)]\nmod tests {\n    use crate::cli::X;\n}\n";
    let found: Vec<String> = crate_paths(&code(text)).into_iter().collect();
    assert_eq!(found, ["kernels", "model", "nn", "optim"]);
    assert!(is_test_file(Path::new("src/kernels/conv/tests.rs")));
    assert!(!is_test_file(Path::new("src/kernels/conv.rs")));
}
