//! Reading the operator's policies: the `*.cedar` files of `policy_dir`, in name order,
//! after the built-in set unless it is turned off. Compiling them is mayfly-common's.

use std::path::Path;

use mayfly_common::policy::{LoadError, PolicyProblem, PolicySource};

use super::PolicyConfig;

/// Policy files larger than this are refused (a policy set is text an operator writes).
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The `*.cedar` files of `dir`, sorted by name. Other files are ignored; a file that
/// cannot be read is a problem named with its path.
pub fn load_dir(dir: &Path) -> Result<Vec<PolicySource>, LoadError> {
    let dir_error = |message: String| LoadError::Dir {
        dir: dir.display().to_string(),
        message,
    };
    let listing = std::fs::read_dir(dir).map_err(|e| dir_error(e.to_string()))?;
    let mut paths: Vec<_> = listing
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "cedar") && p.is_file())
        .collect();
    paths.sort();
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let read = std::fs::metadata(&path).and_then(|meta| {
            if meta.len() > MAX_FILE_BYTES {
                Err(std::io::Error::other(format!(
                    "{} bytes, more than the {MAX_FILE_BYTES} a policy file may have",
                    meta.len()
                )))
            } else {
                std::fs::read_to_string(&path)
            }
        });
        match read {
            Ok(text) => sources.push(PolicySource { name, text }),
            Err(e) => problems.push(PolicyProblem {
                file: name,
                line: 0,
                column: 0,
                message: e.to_string(),
            }),
        }
    }
    if problems.is_empty() {
        Ok(sources)
    } else {
        Err(LoadError::Invalid(problems))
    }
}

/// The sources a configuration names: the built-in set (unless turned off), then `dir`.
pub fn sources(config: &PolicyConfig) -> Result<Vec<PolicySource>, LoadError> {
    let mut sources = Vec::new();
    if config.defaults {
        sources.push(PolicySource::defaults());
    }
    if let Some(dir) = &config.dir {
        sources.extend(load_dir(dir)?);
    }
    Ok(sources)
}
