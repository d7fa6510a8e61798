//! Files only their owner may read (the generated bearer tokens, the data keys): written
//! whole, synced, and created at most once per path.

use std::io::{self, Write};
use std::path::Path;

/// Creates `path` holding `bytes` unless it exists; true when this call created it. The
/// bytes are written whole under a name of their own, then linked into place: the link
/// fails when the file exists, so a reader never sees half a file and no process overwrites
/// what another one already handed out.
pub fn create_once(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let name = path
        .file_name()
        .map_or_else(|| "private".into(), |n| n.to_string_lossy().into_owned());
    let temp = path.with_file_name(format!("{name}.{}.tmp", std::process::id()));
    let written = write(&temp, bytes).and_then(|()| std::fs::hard_link(&temp, path));
    let _ = std::fs::remove_file(&temp);
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to a new file at `path` that only its owner can read, synced to disk.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    // The mode above applies only to a file the open created.
    make_private(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes `path` readable and writable by its owner only.
pub fn make_private(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode != 0o600 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_created_once_and_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        assert!(create_once(&path, b"first").expect("created"));
        assert!(!create_once(&path, b"second").expect("kept"));
        assert_eq!(std::fs::read(&path).expect("read"), b"first");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leftovers = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(leftovers, 1, "no temp file left behind");
    }
}
