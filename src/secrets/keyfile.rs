//! Where the keyring comes from: `KAMIGATE_DATA_KEY`, else `<data dir>/data.key`, generated
//! on the first start readable by its owner only (mode 0600), as [`crate::tokens`] keeps
//! generated tokens.
//!
//! Both hold the same text, one key per line (or separated by `;` in the variable):
//!
//! ```text
//! index i1 <64 hex digits>
//! data d2 <64 hex digits>
//! data d1 <64 hex digits>
//! ```
//!
//! The first `data` key seals new codes; the others only open what they sealed before, until
//! `kamigate rekey` moved it over. Exactly one `index` key keys the code digests.

use std::path::{Path, PathBuf};

use super::{Keyring, KeyringError, KEY_LEN};

/// The file in the data dir that keeps a generated keyring.
pub const KEY_FILE: &str = "data.key";

/// The variable that holds the keyring instead of the file.
pub const KEY_VAR: &str = "KAMIGATE_DATA_KEY";

/// Key text as configured: shown by `Debug` as its length only.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyText(pub String);

impl std::fmt::Debug for KeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyText(<{} bytes withheld>)", self.0.len())
    }
}

/// Where the keyring was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `KAMIGATE_DATA_KEY`.
    Env,
    /// A key file; `fresh` when this start generated it.
    File { path: PathBuf, fresh: bool },
}

/// Why no keyring could be had. Never holds key material.
#[derive(Debug, thiserror::Error)]
#[error("data keys from {origin}: {why}")]
pub struct KeyError {
    origin: String,
    why: String,
}

/// The keyring from `env` (the value of `KAMIGATE_DATA_KEY`) when set, else the one kept in
/// `data_dir`, generated (and kept) when there is none.
pub fn resolve(env: Option<&str>, data_dir: &Path) -> Result<(Keyring, KeySource), KeyError> {
    if let Some(text) = env.filter(|t| !t.trim().is_empty()) {
        let ring = parse(text).map_err(|e| KeyError {
            origin: KEY_VAR.into(),
            why: e.0,
        })?;
        return Ok((ring, KeySource::Env));
    }
    let path = data_dir.join(KEY_FILE);
    let error = |why: String| KeyError {
        origin: path.display().to_string(),
        why,
    };
    match read(&path).map_err(error)? {
        Some(ring) => Ok((ring, KeySource::File { path, fresh: false })),
        None => {
            let ring = keep_new(data_dir, &path).map_err(error)?;
            let fresh = ring.1;
            Ok((ring.0, KeySource::File { path, fresh }))
        }
    }
}

/// Where a running gateway's keyring came from, to read it again: a key file may gain a
/// key while the gateway runs (a rotation).
#[derive(Debug, Clone)]
pub struct KeyOrigin {
    pub source: KeySource,
    pub env: Option<KeyText>,
}

impl KeyOrigin {
    /// The keyring as its origin holds it now.
    pub fn reload(&self) -> Result<Keyring, KeyError> {
        reload(&self.source, self.env.as_ref().map(|k| k.0.as_str()))
    }
}

/// Reads the keyring again from where `source` says it came from (for a rotation while
/// running: the file may have gained a key since the start).
pub fn reload(source: &KeySource, env: Option<&str>) -> Result<Keyring, KeyError> {
    match source {
        KeySource::Env => resolve(env, Path::new("")).map(|(r, _)| r),
        KeySource::File { path, .. } => read(path)
            .map_err(|why| KeyError {
                origin: path.display().to_string(),
                why,
            })?
            .ok_or_else(|| KeyError {
                origin: path.display().to_string(),
                why: "the file is gone".into(),
            }),
    }
}

/// Parses the key text (see the module docs).
pub fn parse(text: &str) -> Result<Keyring, KeyringError> {
    let mut data: Vec<(String, [u8; KEY_LEN])> = Vec::new();
    let mut index: Option<(String, [u8; KEY_LEN])> = None;
    // A `#` starts a comment to the end of its line; `;` separates entries like a newline.
    let entries = text
        .lines()
        .flat_map(|line| line.split('#').next().unwrap_or("").split(';'));
    for (n, line) in entries.enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [kind, id, hex_key] = fields[..] else {
            return Err(KeyringError(format!(
                "entry {} is not `data|index <id> <64 hex digits>`",
                n + 1
            )));
        };
        super::check_key_id(id)?;
        let mut key = [0u8; KEY_LEN];
        hex::decode_to_slice(hex_key, &mut key)
            .map_err(|_| KeyringError(format!("key {id} is not {} hex digits", KEY_LEN * 2)))?;
        match kind {
            "data" => data.push((id.to_owned(), key)),
            "index" if index.is_none() => index = Some((id.to_owned(), key)),
            "index" => return Err(KeyringError("more than one index key".into())),
            other => {
                return Err(KeyringError(format!(
                    "entry {} has kind {other:?}; data or index expected",
                    n + 1
                )))
            }
        }
    }
    let (index_id, index_key) = index.ok_or_else(|| KeyringError("no index key".into()))?;
    let data: Vec<(&str, [u8; KEY_LEN])> = data.iter().map(|(i, k)| (i.as_str(), *k)).collect();
    Keyring::new(&data, (&index_id, index_key))
}

/// The key text of fresh keys `d1` and `i1`.
pub fn generate_text() -> String {
    let data: [u8; KEY_LEN] = rand::random();
    let index: [u8; KEY_LEN] = rand::random();
    format!(
        "# kamigate's data keys, generated on its first start. Keep a copy apart from the\n\
         # ledger's backups: without it no stored code can be read. The first data key seals\n\
         # new codes, the others open older ones; see the README on rotation.\n\
         index i1 {}\ndata d1 {}\n",
        hex::encode(index),
        hex::encode(data)
    )
}

/// A line for a new data key `id`, to put first in the key file (or variable).
pub fn new_data_key_line(id: &str) -> Result<String, KeyringError> {
    super::check_key_id(id)?;
    let key: [u8; KEY_LEN] = rand::random();
    Ok(format!("data {id} {}", hex::encode(key)))
}

/// Adds a fresh data key `id` to the key file at `path` as the sealing key; the others stay
/// to open older codes.
pub fn add_data_key(path: &Path, id: &str) -> Result<(), KeyError> {
    let error = |why: String| KeyError {
        origin: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let ring = parse(&text).map_err(|e| error(e.0))?;
    if ring.data_ids().contains(&id) || ring.index_id() == id {
        return Err(error(format!("key id {id} is taken")));
    }
    let line = new_data_key_line(id).map_err(|e| error(e.0))?;
    // The new line goes before the first data line: the first data key seals.
    let mut out = String::with_capacity(text.len() + line.len() + 1);
    let mut placed = false;
    for l in text.lines() {
        if !placed && l.trim_start().starts_with("data ") {
            out.push_str(&line);
            out.push('\n');
            placed = true;
        }
        out.push_str(l);
        out.push('\n');
    }
    let temp = path.with_extension(format!("{}.tmp", std::process::id()));
    crate::private_file::write(&temp, out.as_bytes())
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            error(e.to_string())
        })
}

/// The kept keyring, `None` when there is no file yet. A file others could read is made
/// private again.
fn read(path: &Path) -> Result<Option<Keyring>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let ring = parse(&text).map_err(|e| e.0)?;
    crate::private_file::make_private(path).map_err(|e| e.to_string())?;
    Ok(Some(ring))
}

/// Generates a keyring and keeps it at `path`; when another process kept its own first,
/// that one is read back instead, so every process on the data dir agrees.
fn keep_new(data_dir: &Path, path: &Path) -> Result<(Keyring, bool), String> {
    std::fs::create_dir_all(data_dir).map_err(|e| e.to_string())?;
    let text = generate_text();
    let ring = parse(&text).map_err(|e| e.0)?;
    match crate::private_file::create_once(path, text.as_bytes()) {
        Ok(true) => Ok((ring, true)),
        Ok(false) => Ok((read(path)?.ok_or("vanished while being read")?, false)),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_file_is_private_and_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ring, source) = resolve(None, dir.path()).expect("generated");
        let KeySource::File { path, fresh } = source else {
            panic!("from a file")
        };
        assert!(fresh);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("file").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let sealed = ring.seal("gift", "1", "CODE");
        let (again, source) = resolve(None, dir.path()).expect("read back");
        assert_eq!(source, KeySource::File { path, fresh: false });
        assert_eq!(again.open("gift", "1", &sealed).as_deref(), Ok("CODE"));
    }

    #[test]
    fn an_added_key_seals_and_the_old_one_still_opens() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ring, _) = resolve(None, dir.path()).expect("generated");
        let old = ring.seal("gift", "1", "CODE");
        add_data_key(&dir.path().join(KEY_FILE), "d2").expect("added");
        let (ring, _) = resolve(None, dir.path()).expect("read back");
        assert_eq!(ring.current_id(), "d2");
        assert_eq!(ring.open("gift", "1", &old).as_deref(), Ok("CODE"));
        assert!(add_data_key(&dir.path().join(KEY_FILE), "d1").is_err());
    }

    #[test]
    fn the_variable_wins_and_errors_hold_no_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hex = "ab".repeat(32);
        let text = format!("index i1 {hex}; data d7 {hex}");
        let (ring, source) = resolve(Some(&text), dir.path()).expect("from the variable");
        assert_eq!(source, KeySource::Env);
        assert_eq!(ring.current_id(), "d7");
        assert!(!dir.path().join(KEY_FILE).exists());

        let short = format!("index i1 {hex}; data d7 {}", &hex[..40]);
        let err = resolve(Some(&short), dir.path()).expect_err("short key");
        assert!(err.to_string().contains(KEY_VAR), "{err}");
        assert!(!err.to_string().contains(&hex[..40]), "{err}");
        assert!(parse(&format!("data d7 {hex}")).is_err());
        assert!(parse(&format!("index i1 {hex}")).is_err());
    }
}
