//! Replays every committed fuzz input through its target: the seed corpora the fuzzer
//! grew (`fuzz/corpus/NAME/`) and the inputs that once crashed a target and were fixed
//! (`fuzz/regressions/NAME/`). A few seconds under `cargo test`, so a crash found once
//! stays fixed without anyone running the fuzzer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use mayfly_fuzz_targets::TARGETS;

#[test]
fn every_committed_fuzz_input_runs_without_a_panic() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let mut inputs = Vec::new();
        for folder in ["corpus", "regressions"] {
            inputs.extend(files_in(&fuzz_dir.join(folder).join(name)));
        }
        assert!(
            !inputs.is_empty(),
            "fuzz target {name} has no committed corpus under fuzz/corpus/{name}/"
        );
        for path in inputs {
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failures.push(format!("{name}: {}", path.display()));
            }
            replayed += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {replayed} fuzz inputs panicked (the panic messages are above):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_fuzz_target_has_its_libfuzzer_entry() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let manifest = std::fs::read_to_string(fuzz_dir.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        let entry = fuzz_dir.join("fuzz_targets").join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&entry).unwrap_or_else(|e| panic!("{}: {e}", entry.display()));
        assert!(
            text.contains(&format!("mayfly_fuzz_targets::{name}(")),
            "{} does not call mayfly_fuzz_targets::{name}",
            entry.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] for {name}"
        );
    }
}

/// The files of `dir`, sorted; none if it does not exist (a target without regressions).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("reading a fuzz input folder").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}
