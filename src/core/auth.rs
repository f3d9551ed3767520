//! API keys: one decision for every protocol.
//!
//! Keys are kept as SHA-256 digests and compared in constant time, digest against digest,
//! every key every time: neither the time an answer takes nor its length tells a caller
//! how much of a key was right. A key is never logged; nor is the header that carried it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;

type KeyDigest = [u8; 32];

pub struct ApiKeys {
    file: Option<PathBuf>,
    digests: RwLock<Arc<Vec<KeyDigest>>>,
}

impl ApiKeys {
    /// No keys: every call is let through.
    pub fn open() -> ApiKeys {
        ApiKeys {
            file: None,
            digests: RwLock::new(Arc::new(vec![])),
        }
    }

    /// Reads the key file. A file that is given but unreadable or holds no key is an
    /// error: a server told to require keys must not start open.
    pub fn from_file(path: &Path) -> Result<ApiKeys, String> {
        Ok(ApiKeys {
            digests: RwLock::new(Arc::new(read_keys(path)?)),
            file: Some(path.to_path_buf()),
        })
    }

    pub fn required(&self) -> bool {
        self.file.is_some()
    }

    /// Re-reads the key file (SIGHUP). On failure the keys in force stay in force.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.file else { return Ok(0) };
        let keys = read_keys(path)?;
        let n = keys.len();
        *self.digests.write().expect("api key lock poisoned: this is a bug") = Arc::new(keys);
        Ok(n)
    }

    /// Checks an `Authorization` value (`Bearer <key>`, the scheme in any case).
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Error> {
        if !self.required() {
            return Ok(());
        }
        let Some(value) = authorization else {
            return Err(Error::Unauthorized(
                "this server needs an API key: send Authorization: Bearer <key>".into(),
            ));
        };
        let key = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim());
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Err(Error::Unauthorized(
                "the Authorization header must be 'Bearer <key>'".into(),
            ));
        };
        let digest: KeyDigest = Sha256::digest(key.as_bytes()).into();
        let keys = self
            .digests
            .read()
            .expect("api key lock poisoned: this is a bug")
            .clone();
        let known = keys
            .iter()
            .fold(subtle::Choice::from(0), |found, k| found | k.ct_eq(&digest));
        if bool::from(known) {
            Ok(())
        } else {
            Err(Error::Unauthorized("the API key is not valid".into()))
        }
    }
}

/// One key per line; blank lines and lines starting with `#` are skipped, and surrounding
/// whitespace (a trailing `\r`) is not part of a key.
fn read_keys(path: &Path) -> Result<Vec<KeyDigest>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading the API key file {}: {e}", path.display()))?;
    let keys: Vec<KeyDigest> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|k| Sha256::digest(k.as_bytes()).into())
        .collect();
    if keys.is_empty() {
        return Err(format!("the API key file {} holds no key", path.display()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> ApiKeys {
        let dir = std::env::temp_dir().join(format!("mcd-keys-{}-{}", std::process::id(), text.len()));
        std::fs::write(&dir, text).unwrap();
        let k = ApiKeys::from_file(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        k
    }

    #[test]
    fn bearer_keys_from_the_file_pass_and_nothing_else_does() {
        let k = keys("# team a\nalpha-key-1\n\n  beta-key-2\r\n");
        assert!(k.check(Some(b"Bearer alpha-key-1")).is_ok());
        assert!(k.check(Some(b"bearer beta-key-2")).is_ok());
        assert!(k.check(Some(b"BEARER  alpha-key-1 ")).is_ok());
        for bad in [
            &b"Bearer alpha-key-"[..],
            b"Bearer alpha-key-12",
            b"Bearer # team a",
            b"Basic alpha-key-1",
            b"alpha-key-1",
            b"Bearer ",
            b"\xff\xfe",
        ] {
            let e = k.check(Some(bad)).unwrap_err();
            assert_eq!(e.error_type(), "unauthorized", "{bad:?}");
        }
        assert!(k.check(None).is_err());
        assert!(ApiKeys::open().check(None).is_ok());
    }

    #[test]
    fn a_key_file_without_keys_is_refused() {
        let path = std::env::temp_dir().join(format!("mcd-keys-empty-{}", std::process::id()));
        std::fs::write(&path, "# nothing yet\n\n").unwrap();
        assert!(ApiKeys::from_file(&path).err().unwrap().contains("holds no key"));
        std::fs::remove_file(&path).unwrap();
        assert!(ApiKeys::from_file(&path).is_err());
    }
}
