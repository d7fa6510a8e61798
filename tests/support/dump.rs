//! Reading what a stolen dump would hold: every file under a directory, a `pg_dump` of a
//! ledger, and whether any of them gives a code away in any case or grouping.

use std::path::Path;

/// Every spelling of `code` a dump could give it away in: as is, lower case, grouped by four
/// with dashes or spaces, and ungrouped.
pub fn spellings(code: &str) -> Vec<String> {
    let plain: String = code.chars().filter(|c| *c != '-' && *c != ' ').collect();
    let grouped = |sep: &str| {
        plain
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(sep)
    };
    let mut out = vec![code.to_owned(), plain.clone(), grouped("-"), grouped(" ")];
    let lower: Vec<String> = out.iter().map(|s| s.to_lowercase()).collect();
    out.extend(lower);
    out.sort();
    out.dedup();
    out
}

/// Whether `bytes` hold `code` in any of its [`spellings`].
pub fn holds(bytes: &[u8], code: &str) -> bool {
    spellings(code)
        .iter()
        .any(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes()))
}

/// Fails naming the spelling and where it was found (the codes are test data).
pub fn assert_absent(what: &str, bytes: &[u8], codes: &[String]) {
    assert!(!bytes.is_empty(), "{what} is empty: nothing was checked");
    for code in codes {
        for s in spellings(code) {
            let found = bytes.windows(s.len()).any(|w| w == s.as_bytes());
            assert!(!found, "{what} holds code {s:?} in clear");
        }
    }
}

/// Every file under `dir`, read whole.
pub fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path.display().to_string(), bytes));
            }
        }
    }
    out
}

/// Checks every non-empty file under a Redis server's directory but its log (which holds
/// no data).
pub fn assert_absent_from_redis_files(dir: &Path, codes: &[String]) {
    for (path, bytes) in files_under(dir) {
        if !path.ends_with(".log") && !bytes.is_empty() {
            assert_absent(&path, &bytes, codes);
        }
    }
}

/// A data-only `pg_dump` of the database at `url`, as a backup would hold it.
pub fn pg_dump(url: &str) -> Vec<u8> {
    let dump = std::process::Command::new("pg_dump")
        .arg("--data-only")
        .arg(url)
        .output()
        .expect("pg_dump runs");
    assert!(
        dump.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    dump.stdout
}
