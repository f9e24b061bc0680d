//! A mutation fuzzer for every reader of user files (cargo-fuzz needs a nightly toolchain,
//! which this project's machines do not have). Each target starts from small valid inputs
//! built here, mutates them (bit flips, interesting bytes and numbers, truncation,
//! insertions, duplicated chunks; JSON inputs also get number and token swaps), writes the
//! result to a file and runs the reader on it. A reader may accept or refuse an input; it
//! must not panic. Panics are caught, counted and their inputs saved; an allocation abort or
//! a hang ends the process and is a crash too (run the command again with the same seed to
//! reproduce it).
//!
//! `ganscope fuzz --target all --seconds 600` runs each target for ten minutes; the test
//! suite runs a few hundred inputs per target from a fixed seed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The fuzz targets, one per reader.
pub const TARGETS: [&str; 10] = [
    "idx-images",
    "idx-labels",
    "cifar",
    "iclevr-objects",
    "iclevr-conditions",
    "attributes",
    "config",
    "latent",
    "checkpoint",
    "png",
];

/// How long a target runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Inputs(u64),
    Time(Duration),
}

/// What one target's run found.
#[derive(Debug, Clone, Default)]
pub struct FuzzReport {
    pub target: String,
    pub execs: u64,
    /// Inputs the reader accepted / refused with an error.
    pub accepted: u64,
    pub refused: u64,
    /// Panics: the message and where the input was saved (if a crash folder was given).
    pub crashes: Vec<(String, Option<PathBuf>)>,
    pub seconds: f64,
}

/// Run `target` for `budget` from `seed`; crashing inputs go to `crash_dir`.
pub fn run(
    target: &str,
    budget: Budget,
    seed: u64,
    crash_dir: Option<&Path>,
) -> Result<FuzzReport> {
    if !TARGETS.contains(&target) {
        return Err(Error::Msg(format!(
            "unknown fuzz target `{target}` (known: {})",
            TARGETS.join(", ")
        )));
    }
    let tmp = std::env::temp_dir().join(format!("ganscope-fuzz-{}-{target}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let corpus = seeds(target, &tmp)?;
    let mut pool: Vec<Vec<u8>> = corpus.clone();
    let mut rng = Rng::stream(seed, "fuzz");
    let mut report = FuzzReport {
        target: target.to_string(),
        ..Default::default()
    };
    let t0 = Instant::now();
    // Panics are expected here and reported: keep the default hook from printing each one.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let json = matches!(
        target,
        "iclevr-objects" | "iclevr-conditions" | "config" | "latent"
    );
    loop {
        let done = match budget {
            Budget::Inputs(n) => report.execs >= n,
            Budget::Time(d) => t0.elapsed() >= d,
        };
        if done {
            break;
        }
        let base = &pool[rng.below(pool.len())];
        let input = mutate(base, &mut rng, json);
        let outcome = std::panic::catch_unwind(|| exec(target, &tmp, &input));
        report.execs += 1;
        match outcome {
            Ok(Ok(())) => {
                report.accepted += 1;
                // Accepted inputs seed further mutation (a little coverage by validity).
                if pool.len() < 256 {
                    pool.push(input);
                }
            }
            Ok(Err(_)) => report.refused += 1,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                let saved = crash_dir.and_then(|d| {
                    std::fs::create_dir_all(d).ok()?;
                    let p = d.join(format!("{target}-{}.bin", report.crashes.len()));
                    std::fs::write(&p, &input).ok().map(|_| p)
                });
                report.crashes.push((msg, saved));
            }
        }
    }
    std::panic::set_hook(hook);
    report.seconds = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(report)
}

/// Run the reader of `target` on `input` (written where that reader expects its file).
pub fn exec(target: &str, dir: &Path, input: &[u8]) -> Result<()> {
    let write = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, input).map_err(|e| Error::io(&p, e))?;
        Ok(p)
    };
    match target {
        "idx-images" => crate::data::idx::read_idx_images(write("images-idx3-ubyte")?).map(|_| ()),
        "idx-labels" => crate::data::idx::read_idx_labels(write("labels-idx1-ubyte")?).map(|_| ()),
        "cifar" => crate::data::cifar::read_cifar_batch(&write("data_batch_1.bin")?).map(|_| ()),
        "iclevr-objects" => crate::data::iclevr::read_objects(&write("objects.json")?).map(|_| ()),
        "iclevr-conditions" => {
            let names = crate::data::iclevr::default_object_names();
            // Both readers see every input: test.json's list and train.json's object form.
            let p = write("test.json")?;
            let list = crate::data::iclevr::read_conditions(&p, &names).map(|_| ());
            let train = crate::data::iclevr::read_train_labels(&p, &names).map(|_| ());
            list.or(train)
        }
        "attributes" => {
            crate::data::folder::read_attribute_list(&write("list_attr.txt")?).map(|_| ())
        }
        "config" => {
            let text = std::str::from_utf8(input).map_err(|e| Error::Msg(e.to_string()))?;
            let cfg: crate::config::TrainConfig =
                serde_json::from_str(text).map_err(|e| Error::Msg(e.to_string()))?;
            cfg.validate()
        }
        "latent" => crate::explore::LatentSpec::read(&write("latent.json")?).map(|_| ()),
        "checkpoint" => {
            let run = dir.join("run");
            write_seed_checkpoint(&run)?;
            let g = run.join("generator.safetensors");
            std::fs::write(&g, input).map_err(|e| Error::io(&g, e))?;
            crate::checkpoint::load_latest(&run, &Device::Cpu).map(|_| ())
        }
        "png" => crate::data::folder::read_image_chw(&write("image.png")?, 8).map(|_| ()),
        _ => Err(Error::Msg(format!("unknown fuzz target `{target}`"))),
    }
}

/// The valid starting inputs of a target.
fn seeds(target: &str, dir: &Path) -> Result<Vec<Vec<u8>>> {
    let be = |v: u32| v.to_be_bytes();
    Ok(match target {
        "idx-images" => {
            let mut v = [be(0x803), be(2), be(3), be(2)].concat();
            v.extend(0..12u8);
            vec![v]
        }
        "idx-labels" => {
            let mut v = [be(0x801), be(3)].concat();
            v.extend([1u8, 7, 9]);
            vec![v]
        }
        "cifar" => {
            let mut rec = vec![3u8];
            rec.extend((0..3072).map(|i| (i % 251) as u8));
            vec![rec.repeat(2)]
        }
        "iclevr-objects" => {
            let names = crate::data::iclevr::default_object_names();
            let map: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), serde_json::Value::from(i)))
                .collect();
            vec![serde_json::to_vec(&map).map_err(|e| Error::Msg(e.to_string()))?]
        }
        "iclevr-conditions" => vec![
            br#"[["gray cube"], ["red sphere", "blue cylinder"], ["green cube", "cyan sphere", "yellow cylinder"]]"#.to_vec(),
            br#"{"CLEVR_train_000000_0.png": ["gray cube"], "CLEVR_train_000000_1.png": ["gray cube", "red sphere"]}"#.to_vec(),
        ],
        "attributes" => vec![b"2\nSmiling Male Young\na.png 1 -1 1\nb.png -1 1 1\n".to_vec()],
        "config" => vec![
            serde_json::to_vec(&crate::config::TrainConfig::mnist_cdcgan())
                .map_err(|e| Error::Msg(e.to_string()))?,
            serde_json::to_vec(&crate::config::TrainConfig::iclevr_small())
                .map_err(|e| Error::Msg(e.to_string()))?,
        ],
        "latent" => vec![
            br#"{"preset": "iclevr-small", "step": 5, "z": [0.5, -1.25, 2.0], "condition": [1, 0, 1], "labels": ["gray cube"]}"#.to_vec(),
        ],
        "checkpoint" => {
            let run = dir.join("run");
            write_seed_checkpoint(&run)?;
            let g = run.join("generator.safetensors");
            vec![std::fs::read(&g).map_err(|e| Error::io(&g, e))?]
        }
        "png" => {
            let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 9]));
            let mut v = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
                .map_err(|e| Error::Msg(e.to_string()))?;
            vec![v]
        }
        _ => vec![],
    })
}

/// A small valid checkpoint in `run` (the same bytes every time).
fn write_seed_checkpoint(run: &Path) -> Result<()> {
    if run.join("optimizer.safetensors").exists() {
        return Ok(());
    }
    let d = &Device::Cpu;
    let f = |name: &str, v: Vec<f32>, shape: &[usize]| -> Result<(String, Tensor)> {
        Ok((name.to_string(), Tensor::from_vec(v, shape, d)?))
    };
    let g: HashMap<String, Tensor> = [
        f(
            "gen.fc.weight",
            (0..12).map(|i| i as f32 / 7.0).collect(),
            &[3, 4],
        )?,
        f("gen.fc.bias", vec![0.5, -0.5, 0.25], &[3])?,
    ]
    .into();
    let dd: HashMap<String, Tensor> = [f("disc.fc.weight", vec![1.0, 2.0], &[1, 2])?].into();
    let o: HashMap<String, Tensor> =
        [("trainer.step".to_string(), Tensor::new(&[3i64], d)?)].into();
    crate::checkpoint::save(run, 3, [&g, &dd, &o])
}

/// One mutation of `base` (1 to 4 edits).
pub fn mutate(base: &[u8], rng: &mut Rng, json: bool) -> Vec<u8> {
    let mut v = base.to_vec();
    let edits = 1 + rng.below(4);
    for _ in 0..edits {
        let n = v.len();
        match rng.below(if json { 9 } else { 7 }) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = [0u8, 0xff, 0x7f, 0x80, 1, b'-', b'9'][rng.below(7)];
            }
            2 if n > 0 => v.truncate(rng.below(n)),
            3 => {
                let i = rng.below(n + 1);
                let k = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..k).map(|_| rng.below(256) as u8).collect();
                v.splice(i..i, bytes);
            }
            4 if n > 0 => {
                let a = rng.below(n);
                let b = (a + 1 + rng.below(64)).min(n);
                let chunk = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            5 if n >= 4 => {
                // An interesting 32-bit number, big- or little-endian.
                let i = rng.below(n - 3);
                let x = [0u32, 1, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x0001_0000][rng.below(6)];
                let b = if rng.below(2) == 0 {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                };
                v[i..i + 4].copy_from_slice(&b);
            }
            6 if n > 0 => {
                let a = rng.below(n);
                let b = (a + 1 + rng.below(16)).min(n);
                v.drain(a..b);
            }
            7 => {
                // Replace a number in JSON by an extreme one.
                let text = String::from_utf8_lossy(&v).into_owned();
                let starts: Vec<usize> = text
                    .char_indices()
                    .filter(|(_, c)| c.is_ascii_digit())
                    .map(|(i, _)| i)
                    .collect();
                if let Some(&s) = starts.get(rng.below(starts.len().max(1))) {
                    let e = text[s..]
                        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-'))
                        .map_or(text.len(), |k| s + k);
                    let repl = [
                        "1e309",
                        "-1",
                        "0",
                        "18446744073709551616",
                        "1e-320",
                        "4294967296",
                        "99999999999",
                    ][rng.below(7)];
                    v = format!("{}{}{}", &text[..s], repl, &text[e..]).into_bytes();
                }
            }
            8 => {
                // Swap in a JSON token.
                let text = String::from_utf8_lossy(&v).into_owned();
                let tokens = [
                    "null",
                    "[]",
                    "{}",
                    "\"\"",
                    "true",
                    "[[]]",
                    "\"../../x\"",
                    "-0",
                ];
                let i = rng.below(text.len() + 1);
                let i = (0..=i)
                    .rev()
                    .find(|&k| text.is_char_boundary(k))
                    .unwrap_or(0);
                v = format!(
                    "{}{}{}",
                    &text[..i],
                    tokens[rng.below(tokens.len())],
                    &text[i..]
                )
                .into_bytes();
            }
            _ => {}
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reader_survives_a_few_hundred_mutated_inputs() {
        // A short, seeded version of `ganscope fuzz` (ten minutes per target are in the
        // issue's note): every input is accepted or refused, none panics, and the seeds of
        // each target are accepted (so the mutations start from valid files).
        let tmp = tempfile::tempdir().unwrap();
        for t in TARGETS {
            let dir = tmp.path().join(t);
            std::fs::create_dir_all(&dir).unwrap();
            for s in seeds(t, &dir).unwrap() {
                exec(t, &dir, &s).unwrap_or_else(|e| panic!("{t}: a seed input is refused: {e}"));
            }
            let r = run(t, Budget::Inputs(300), 7, None).unwrap();
            assert_eq!(r.execs, 300);
            assert!(r.crashes.is_empty(), "{t}: {:?}", r.crashes);
            assert!(r.refused > 0, "{t}: the mutations never broke the input");
        }
    }
}
