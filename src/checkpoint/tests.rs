use super::*;
use serde_json::json;

type Set = [HashMap<String, Tensor>; 3];

fn cpu() -> Device {
    Device::Cpu
}

/// Three files with f32 (incl. -0, the extremes and a subnormal: NaN and infinities are
/// refused by `save`), f64, i64 and u8 tensors.
fn make_set(seed: u32) -> Set {
    let d = cpu();
    let s = seed as f32;
    let f32s = vec![
        s,
        -0.0,
        f32::MAX,
        f32::from_bits(0x0000_1234),
        f32::MIN,
        -f32::EPSILON,
        f32::MIN_POSITIVE / 3.0,
        1.0 / 3.0 + s,
    ];
    let f64s: Vec<f64> = (0..6)
        .map(|i| f64::from(seed) * 1e-300 + f64::from(i) / 7.0)
        .collect();
    let i64s = vec![i64::MIN, -1, 0, i64::from(seed), i64::MAX];
    let u8s: Vec<u8> = (0..12).map(|i| (i * 37 + seed) as u8).collect();
    let g = HashMap::from([
        (
            "net.0.weight".to_string(),
            Tensor::from_vec(f32s.clone(), (2, 4), &d).unwrap(),
        ),
        (
            "net.0.bias".to_string(),
            Tensor::from_vec(f64s.clone(), 6, &d).unwrap(),
        ),
        ("scalar".to_string(), Tensor::new(s, &d).unwrap()),
        (
            "empty".to_string(),
            Tensor::zeros((0, 3), DType::F32, &d).unwrap(),
        ),
    ]);
    let dis = HashMap::from([
        ("w".to_string(), Tensor::from_vec(f64s, (3, 2), &d).unwrap()),
        ("labels".to_string(), Tensor::from_vec(i64s, 5, &d).unwrap()),
        (
            "bytes".to_string(),
            Tensor::from_vec(u8s.clone(), (2, 2, 3), &d).unwrap(),
        ),
    ]);
    let opt = HashMap::from([
        (
            "adam.m.net.0.weight".to_string(),
            Tensor::from_vec(f32s, (4, 2), &d).unwrap(),
        ),
        ("rng".to_string(), Tensor::from_vec(u8s, 12, &d).unwrap()),
        (
            "step".to_string(),
            Tensor::new(&[i64::from(seed)], &d).unwrap(),
        ),
    ]);
    [g, dis, opt]
}

fn refs(set: &Set) -> [&HashMap<String, Tensor>; 3] {
    [&set[0], &set[1], &set[2]]
}

/// The raw little-endian bytes of a tensor.
fn raw(t: &Tensor) -> (DType, Vec<usize>, Vec<u8>) {
    let f = t.flatten_all().unwrap();
    let bytes: Vec<u8> = match t.dtype() {
        DType::F32 => f
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => f
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => f
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => f.to_vec1::<u8>().unwrap(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (t.dtype(), t.dims().to_vec(), bytes)
}

fn assert_same(got: &Set, want: &Set) {
    for role in 0..3 {
        let mut a: Vec<_> = got[role].keys().collect();
        let mut b: Vec<_> = want[role].keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "tensor names of {}", FILES[role]);
        for (name, t) in &want[role] {
            assert_eq!(raw(&got[role][name]), raw(t), "{} / {name}", FILES[role]);
        }
    }
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn round_trip_is_bit_identical() {
    let d = dir();
    let set = make_set(1);
    save(d.path(), 42, refs(&set)).unwrap();
    let got = load_latest(d.path(), &cpu()).unwrap();
    assert_eq!(got.step, 42);
    assert_same(&got.files, &set);
    assert!(got.notes.is_empty(), "{:?}", got.notes);
    for (role, file) in FILES.iter().enumerate() {
        assert_eq!(got.paths[role], d.path().join(file));
        let m = &got.metadata[role];
        assert_eq!(m[KEY_STEP], "42");
        assert_eq!(m[KEY_FORMAT], FORMAT);
        assert_eq!(m[KEY_SAVE_ID], got.save_id);
        assert_eq!(m[KEY_DATA_HASH].len(), 16);
        assert_ne!(m[KEY_DATA_HASH], HASH_PLACEHOLDER);
    }
    // Plain safetensors readers can open the files too.
    let plain = candle_core::safetensors::load(d.path().join(FILES[1]), &cpu()).unwrap();
    assert_eq!(raw(&plain["labels"]), raw(&set[1]["labels"]));
}

#[test]
fn non_finite_values_are_never_written() {
    // A NaN in an f32 tensor, then +inf in an f16 one: each save is refused naming the
    // tensor, and the folder still holds the earlier healthy set, untouched.
    let d = dir();
    let good = make_set(1);
    save(d.path(), 10, refs(&good)).unwrap();
    for (dtype, bad_value) in [(DType::F32, f64::NAN), (DType::F16, f64::INFINITY)] {
        let mut bad = make_set(2);
        let t = Tensor::new(&[1.0f64, bad_value, 3.0], &cpu())
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        bad[0].insert("poisoned".into(), t);
        let err = save(d.path(), 20, refs(&bad)).unwrap_err().to_string();
        assert!(
            err.contains("`poisoned`") && err.contains("non-finite"),
            "{err}"
        );
        let w = save_weights(&d.path().join("w"), 20, &bad[0], &bad[1]).unwrap_err();
        assert!(w.to_string().contains("`poisoned`"), "{w}");
        let got = load_latest(d.path(), &cpu()).unwrap();
        assert_eq!(got.step, 10);
        assert_same(&got.files, &good);
        for role in 0..3 {
            assert!(!suffixed(d.path(), role, &tmp_suffix()).exists());
        }
    }
}

#[cfg(unix)]
#[test]
fn a_fifo_named_like_a_checkpoint_is_refused_not_waited_on() {
    // `open` on a FIFO blocks until a writer comes: loading ran forever. Now the FIFO is
    // refused as "not a regular file" and the previous set loads. Run in a thread so a
    // regression fails in seconds instead of hanging the suite.
    let d = dir();
    let good = make_set(1);
    save(d.path(), 10, refs(&good)).unwrap();
    save(d.path(), 20, refs(&make_set(2))).unwrap();
    let g = d.path().join(FILES[GENERATOR]);
    fs::remove_file(&g).unwrap();
    let ok = std::process::Command::new("mkfifo")
        .arg(&g)
        .status()
        .unwrap();
    assert!(ok.success());
    let p = d.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(load_latest(&p, &Device::Cpu).map(|s| (s.step, s.notes)));
    });
    let (step, notes) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("loading hung on a FIFO")
        .unwrap();
    assert_eq!(step, 10);
    let all = notes.join("; ");
    assert!(all.contains("not a regular file"), "{all}");
    let e = read_regular(&g).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn a_changed_header_is_detected() {
    // Changing a tensor's dtype in the header (F32 -> I32, same length) kept the data
    // checksum valid: garbage weights loaded, trained and were re-saved. The header has
    // its own checksum now: the newest set is rejected and the previous one loads.
    let d = dir();
    let good = make_set(1);
    save(d.path(), 10, refs(&good)).unwrap();
    save(d.path(), 20, refs(&make_set(2))).unwrap();
    let g = d.path().join(FILES[GENERATOR]);
    let mut bytes = fs::read(&g).unwrap();
    let n = header_len(&bytes).unwrap();
    let at = find(&bytes[8..8 + n], b"\"F32\"").unwrap() + 8;
    bytes[at + 1..at + 4].copy_from_slice(b"I32");
    fs::write(&g, &bytes).unwrap();
    let got = load_latest(d.path(), &cpu()).unwrap();
    assert_eq!(got.step, 10);
    assert_same(&got.files, &good);
    let notes = got.notes.join("; ");
    assert!(notes.contains("header checksum"), "{notes}");
}

#[test]
fn a_run_folder_has_one_writer_at_a_time() {
    let d = dir();
    let run = d.path().join("run");
    let first = RunLock::acquire(&run).unwrap();
    let e = RunLock::acquire(&run).unwrap_err().to_string();
    let pid = std::process::id().to_string();
    assert!(e.contains("in use") && e.contains(&pid), "{e}");
    drop(first);
    // Leftovers of an interrupted save are removed when the next writer takes the lock.
    // Of this version (per-process names) and of older ones (`.tmp`), but nothing else.
    let stale = [
        format!("{}{TMP_SUFFIX}", FILES[GENERATOR]),
        format!("{}{TMP_SUFFIX}-4242", FILES[DISCRIMINATOR]),
        format!("{CONFIG_FILE}{TMP_SUFFIX}-1"),
        format!("{METRICS_FILE}{}", tmp_suffix()),
    ]
    .map(|n| run.join(n));
    let kept = [
        "notes.tmp-1",
        "generator.safetensors.tmp-x",
        "config.json.tmpl",
    ]
    .map(|n| run.join(n));
    for p in stale.iter().chain(&kept) {
        fs::write(p, b"half a file").unwrap();
    }
    let again = RunLock::acquire(&run).unwrap();
    assert_eq!(fs::read_to_string(&again.path).unwrap().trim(), pid);
    for p in &stale {
        assert!(!p.exists(), "{}", p.display());
    }
    for p in &kept {
        assert!(p.exists(), "{}", p.display());
    }
}

#[test]
fn a_write_that_fails_halfway_leaves_no_file() {
    // Issue 19: a save that failed on a full disk left partial temporary files, which took
    // the space the next attempt needed.
    let d = dir();
    let p = d
        .path()
        .join(format!("generator.safetensors{}", tmp_suffix()));
    let e = write_synced_with(&p, &[7u8; 4096], |f, b| {
        f.write_all(&b[..1000])?;
        Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device",
        ))
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("No space left") && e.contains("generator.safetensors"),
        "{e}"
    );
    assert!(!p.exists());
    write_synced_with(&p, &[7u8; 16], |f, b| f.write_all(b)).unwrap();
    assert_eq!(fs::read(&p).unwrap(), [7u8; 16]);
}

#[test]
fn free_space_is_checked_before_work_with_a_clear_error() {
    // Issue 19: a full disk was found only at the first save, after the training.
    let d = dir();
    let free = free_bytes(d.path()).unwrap().expect("statvfs on unix");
    assert!(free > 0);
    check_free_space(d.path(), 1).unwrap();
    check_free_space(d.path(), free / 2).unwrap();
    let e = check_free_space(d.path(), u64::MAX / 2)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not enough free space")
            && e.contains(&d.path().display().to_string())
            && e.contains("needed"),
        "{e}"
    );
    assert!(free_bytes(&d.path().join("missing")).is_err());
    assert_eq!(human_bytes(512), "512 B");
    assert_eq!(human_bytes(3 << 29), "1.5 GiB");
}

#[test]
fn second_save_wins_and_first_becomes_prev() {
    let d = dir();
    let (a, b) = (make_set(1), make_set(2));
    save(d.path(), 10, refs(&a)).unwrap();
    save(d.path(), 20, refs(&b)).unwrap();
    let got = load_latest(d.path(), &cpu()).unwrap();
    assert_eq!(got.step, 20);
    assert_same(&got.files, &b);
    for role in 0..3 {
        assert!(suffixed(d.path(), role, PREV_SUFFIX).exists());
        assert!(!suffixed(d.path(), role, &tmp_suffix()).exists());
    }
    // Only the three files, their backups, nothing else at the top level.
    let mut names: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = FILES
        .iter()
        .flat_map(|f| [f.to_string(), format!("{f}{PREV_SUFFIX}")])
        .collect();
    want.sort();
    assert_eq!(names, want);
}

/// Run `save_with_crash` at every crash point; returns the number of operations of a
/// complete save.
fn crash_everywhere(
    setup: impl Fn(&Path),
    step: u64,
    new: &Set,
    check: impl Fn(&Path, bool),
) -> usize {
    for k in 0.. {
        let d = dir();
        setup(d.path());
        let res = save_with_crash(d.path(), step, refs(new), k);
        check(d.path(), res.is_ok());
        if res.is_ok() {
            return k;
        }
        assert!(res.unwrap_err().to_string().contains("simulated crash"));
        assert!(k < 20, "save never completes");
    }
    unreachable!()
}

#[test]
fn crash_at_every_point_of_second_save_never_mixes() {
    let (a, b) = (make_set(1), make_set(2));
    let ops = crash_everywhere(
        |p| save(p, 10, refs(&a)).unwrap(),
        20,
        &b,
        |p, done| {
            let got = load_latest(p, &cpu()).unwrap();
            if done {
                assert_eq!(got.step, 20);
                assert_same(&got.files, &b);
            } else {
                assert_eq!(got.step, 10);
                assert_same(&got.files, &a);
            }
        },
    );
    assert_eq!(ops, 3 + 6);
}

#[test]
fn crash_during_first_save_leaves_no_checkpoint_or_the_whole_one() {
    let a = make_set(1);
    let ops = crash_everywhere(
        |_| {},
        10,
        &a,
        |p, done| match load_latest(p, &cpu()) {
            Ok(got) => {
                assert!(done);
                assert_same(&got.files, &a);
            }
            Err(Error::NoCheckpoint { .. }) => assert!(!done),
            Err(e) => panic!("{e}"),
        },
    );
    assert_eq!(ops, 3 + 3);
}

#[test]
fn crash_after_crash_keeps_the_last_good_set() {
    let (a, b, c, e) = (make_set(1), make_set(2), make_set(3), make_set(4));
    for k1 in 0..9 {
        // First crash, during save 2: set `a` is still the latest.
        let setup = |p: &Path| {
            save(p, 10, refs(&a)).unwrap();
            assert!(save_with_crash(p, 20, refs(&b), k1).is_err());
        };
        crash_everywhere(setup, 30, &c, |p, done| {
            let got = load_latest(p, &cpu()).unwrap();
            if done {
                assert_eq!(got.step, 30, "k1={k1}");
                assert_same(&got.files, &c);
            } else {
                assert_eq!(got.step, 10, "k1={k1}");
                assert_same(&got.files, &a);
            }
            // And the folder recovers fully with the next save.
            save(p, 40, refs(&e)).unwrap();
            let got = load_latest(p, &cpu()).unwrap();
            assert_eq!(got.step, 40);
            assert_same(&got.files, &e);
        });
    }
}

#[test]
fn tmp_files_are_never_loaded() {
    let d = dir();
    let (a, b) = (make_set(1), make_set(2));
    save(d.path(), 10, refs(&a)).unwrap();
    // All three tmp files complete, no rename done.
    assert!(save_with_crash(d.path(), 20, refs(&b), 3).is_err());
    for role in 0..3 {
        assert!(suffixed(d.path(), role, &tmp_suffix()).exists());
    }
    assert_eq!(load_latest(d.path(), &cpu()).unwrap().step, 10);
}

#[test]
fn truncated_current_file_falls_back_to_prev_set() {
    let d = dir();
    let (a, b, c) = (make_set(1), make_set(2), make_set(3));
    save(d.path(), 10, refs(&a)).unwrap();
    save(d.path(), 20, refs(&b)).unwrap();
    let g = d.path().join(FILES[GENERATOR]);
    let len = fs::metadata(&g).unwrap().len();
    File::options()
        .write(true)
        .open(&g)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let got = load_latest(d.path(), &cpu()).unwrap();
    assert_eq!(got.step, 10);
    assert_same(&got.files, &a);
    assert!(
        got.paths
            .iter()
            .all(|p| p.to_string_lossy().ends_with(PREV_SUFFIX))
    );
    let notes = got.notes.join("\n");
    assert!(
        notes.contains("generator.safetensors: truncated"),
        "{notes}"
    );
    assert!(notes.contains("incomplete"), "{notes}");

    // A save over this state keeps `a` safe at every crash point...
    let setup = |p: &Path| {
        for entry in fs::read_dir(d.path()).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), p.join(entry.file_name())).unwrap();
        }
    };
    crash_everywhere(setup, 30, &c, |p, done| {
        let got = load_latest(p, &cpu()).unwrap();
        if done {
            assert_same(&got.files, &c);
        } else {
            assert_eq!(got.step, 10);
            assert_same(&got.files, &a);
        }
    });
}

#[test]
fn flipped_bit_in_tensor_data_is_detected() {
    let d = dir();
    let (a, b) = (make_set(1), make_set(2));
    save(d.path(), 10, refs(&a)).unwrap();
    save(d.path(), 20, refs(&b)).unwrap();
    let p = d.path().join(FILES[DISCRIMINATOR]);
    let mut bytes = fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    fs::write(&p, &bytes).unwrap();
    let got = load_latest(d.path(), &cpu()).unwrap();
    assert_eq!(got.step, 10);
    assert_same(&got.files, &a);
    assert!(
        got.notes
            .join("\n")
            .contains("discriminator.safetensors: corrupt: tensor data checksum")
    );
}

#[test]
fn garbage_everywhere_is_a_no_checkpoint_error_naming_the_files() {
    let d = dir();
    let empty = load_latest(d.path(), &cpu()).unwrap_err();
    assert!(matches!(empty, Error::NoCheckpoint { .. }));
    assert!(
        empty.to_string().contains("generator.safetensors"),
        "{empty}"
    );

    let mut huge = 5_000u64.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    let mut bad_json = 4u64.to_le_bytes().to_vec();
    bad_json.extend_from_slice(b"{]}x");
    let mut non_utf8 = 2u64.to_le_bytes().to_vec();
    non_utf8.extend_from_slice(&[0xFF, 0xFE]);
    let plain = {
        let t = HashMap::from([("x".to_string(), Tensor::new(&[1f32, 2.], &cpu()).unwrap())]);
        safetensors::serialize(&t, None).unwrap()
    };
    let garbage: [&[u8]; 6] = [
        b"",
        b"hello",
        &u64::MAX.to_le_bytes(),
        &huge,
        &bad_json,
        &non_utf8,
    ];
    let cases: Vec<&[u8]> = garbage.iter().copied().chain([plain.as_slice()]).collect();
    for (i, junk) in cases.iter().enumerate() {
        for role in 0..3 {
            fs::write(file_path(d.path(), role), junk).unwrap();
            fs::write(
                suffixed(d.path(), role, PREV_SUFFIX),
                cases[(i + 1) % cases.len()],
            )
            .unwrap();
        }
        let err = load_latest(d.path(), &cpu()).unwrap_err();
        assert!(matches!(err, Error::NoCheckpoint { .. }), "{err}");
        let msg = err.to_string();
        for f in FILES {
            assert!(msg.contains(&format!("{f}:")), "{msg}");
            assert!(msg.contains(&format!("{f}{PREV_SUFFIX}:")), "{msg}");
        }
    }
    // The foreign-but-valid safetensors file is recognised as such.
    fs::write(file_path(d.path(), 0), &plain).unwrap();
    let msg = load_latest(d.path(), &cpu()).unwrap_err().to_string();
    assert!(msg.contains("not a ganscope checkpoint"), "{msg}");
    // A save over garbage works.
    let a = make_set(1);
    save(d.path(), 5, refs(&a)).unwrap();
    assert_same(&load_latest(d.path(), &cpu()).unwrap().files, &a);
}

#[test]
fn incomplete_sets_are_described() {
    let d = dir();
    let (a, b) = (make_set(1), make_set(2));
    save(d.path(), 10, refs(&a)).unwrap();
    save(d.path(), 20, refs(&b)).unwrap();
    for role in 0..3 {
        fs::remove_file(suffixed(d.path(), role, PREV_SUFFIX)).unwrap();
    }
    fs::remove_file(file_path(d.path(), OPTIMIZER)).unwrap();
    let msg = load_latest(d.path(), &cpu()).unwrap_err().to_string();
    assert!(msg.contains("optimizer.safetensors: missing"), "{msg}");
    assert!(msg.contains("(step 20) has generator.safetensors, discriminator.safetensors but lacks optimizer.safetensors"), "{msg}");
}

#[test]
fn check_shapes_names_tensor_and_shapes() {
    let d = cpu();
    let p = Path::new("run/generator.safetensors");
    let found = HashMap::from([
        (
            "a".to_string(),
            Tensor::zeros((2, 3), DType::F32, &d).unwrap(),
        ),
        ("b".to_string(), Tensor::zeros(4, DType::F32, &d).unwrap()),
    ]);
    let exp = |v: &[(&str, &[usize])]| -> Vec<(String, Vec<usize>)> {
        v.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()
    };
    check_shapes(p, &exp(&[("a", &[2, 3]), ("b", &[4])]), &found).unwrap();

    let err =
        check_shapes(p, &exp(&[("a", &[2, 3]), ("b", &[4]), ("c", &[1])]), &found).unwrap_err();
    assert!(matches!(&err, Error::MissingTensor { name, .. } if name == "c"));
    assert!(err.to_string().contains("generator.safetensors") && err.to_string().contains("`c`"));

    let err = check_shapes(p, &exp(&[("a", &[3, 2]), ("b", &[4])]), &found).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, expected, found, .. }
        if name == "a" && expected == &[3, 2] && found == &[2, 3])
    );
    assert!(
        msg.contains("`a`") && msg.contains("[2, 3]") && msg.contains("[3, 2]"),
        "{msg}"
    );

    let err = check_shapes(p, &exp(&[("a", &[2, 3])]), &found).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::BadFile { .. }));
    assert!(
        msg.contains("`b`") && msg.contains("generator.safetensors"),
        "{msg}"
    );
}

#[test]
fn write_atomic_replaces_and_leaves_no_tmp() {
    let d = dir();
    let p = d.path().join(CONFIG_FILE);
    write_atomic(&p, b"{\"a\":1}").unwrap();
    write_atomic(&p, b"{\"a\":2}").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"{\"a\":2}");
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
}

#[test]
fn metrics_append_read_and_truncate() {
    let d = dir();
    let p = d.path();
    assert!(read_metrics(p).unwrap().is_empty());
    assert_eq!(truncate_metrics_after(p, 3).unwrap(), 0);
    for s in 1..=5u64 {
        append_metrics(p, &json!({"step": s, "d_loss": 0.5})).unwrap();
    }
    append_metrics(p, &json!({"event": "late"})).unwrap();
    // A torn last line, as left by a crash.
    let mut f = OpenOptions::new()
        .append(true)
        .open(p.join(METRICS_FILE))
        .unwrap();
    f.write_all(b"{\"step\": 6, \"d_lo").unwrap();
    drop(f);
    let (v, skipped) = read_metrics_counted(p).unwrap();
    assert_eq!((v.len(), skipped), (6, 1));
    assert_eq!(v[4]["step"], 5);

    assert_eq!(truncate_metrics_after(p, 3).unwrap(), 1);
    let v = read_metrics(p).unwrap();
    let steps: Vec<u64> = v.iter().map(|x| x["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3]);
    assert!(!p.join(format!("{METRICS_FILE}{}", tmp_suffix())).exists());
    // Idempotent.
    assert_eq!(truncate_metrics_after(p, 3).unwrap(), 0);

    // Appending after a torn line drops the fragment instead of gluing to it.
    let mut f = OpenOptions::new()
        .append(true)
        .open(p.join(METRICS_FILE))
        .unwrap();
    f.write_all(b"{\"step\": 4, \"d_").unwrap();
    drop(f);
    append_metrics(p, &json!({"step": 4})).unwrap();
    let (v, skipped) = read_metrics_counted(p).unwrap();
    assert_eq!((v.len(), skipped), (4, 0));
    // ...but a complete last line without a newline is kept.
    let mut f = OpenOptions::new()
        .append(true)
        .open(p.join(METRICS_FILE))
        .unwrap();
    f.write_all(b"{\"step\": 5}").unwrap();
    drop(f);
    append_metrics(p, &json!({"step": 6})).unwrap();
    assert_eq!(read_metrics(p).unwrap().len(), 6);

    // Garbage in the middle is an error naming the line.
    let mut f = OpenOptions::new()
        .append(true)
        .open(p.join(METRICS_FILE))
        .unwrap();
    f.write_all(b"not json\n{\"step\": 7}\n").unwrap();
    drop(f);
    let msg = read_metrics(p).unwrap_err().to_string();
    assert!(
        msg.contains("metrics.jsonl") && msg.contains("line 7"),
        "{msg}"
    );
    // ...which truncation drops and counts.
    assert_eq!(truncate_metrics_after(p, 100).unwrap(), 1);
    assert_eq!(read_metrics(p).unwrap().len(), 7);
}

#[test]
fn hash_detects_single_word_changes() {
    let base: Vec<u8> = (0..100u8).collect();
    let h = data_hash(&base);
    for i in 0..base.len() {
        let mut m = base.clone();
        m[i] ^= 1;
        assert_ne!(data_hash(&m), h, "byte {i}");
    }
    assert_ne!(data_hash(&base[..99]), h);
    assert_ne!(data_hash(&[]), data_hash(&[0]));
}
