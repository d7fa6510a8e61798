//! Codes at rest: the keyring that seals every code before it is stored and the keyed
//! digest that indexes codes without revealing them.
//!
//! A card code is money, and the ledger, the engine and every dump or replica of them are
//! read by more people and processes than the gateway. So a code is stored only sealed
//! (XChaCha20-Poly1305, a random 192-bit nonce per seal), as
//! `e1.<data key id>.<base64url(nonce ‖ ciphertext ‖ tag)>`, with the SKU and the key's local
//! id as associated data: a ciphertext copied onto another key, or another SKU, fails to
//! open instead of handing out someone else's code. The key id in the text lets old data stay
//! readable while a newer key seals new data ([`crate::inventory::rekey`] moves old data over).
//!
//! Codes are found by a digest, and an unkeyed hash of a short supplier code (8–12 digits)
//! is reversed offline by trying them all. The digest is therefore HMAC-SHA-256 under a
//! separate index key, written `<index key id>.<hex>`: a dump without the key allows no
//! guessing, and a re-index can tell digests under an old index key from new ones.
//!
//! The keys come from `KAMIGATE_DATA_KEY` or from `<data dir>/data.key` (generated on the
//! first start, mode 0600, see [`keyfile`]). Nothing here ever formats a key or a code into
//! an error or a log line: errors name key ids only.

pub mod keyfile;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Version tag of the sealed text form; a text without it was stored before encryption.
pub const SEALED_PREFIX: &str = "e1.";

/// Bytes of an XChaCha20 nonce.
const NONCE_LEN: usize = 24;

/// Bytes of every key (data and index).
pub const KEY_LEN: usize = 32;

/// Longest key id: ids are written into every sealed code and digest.
const MAX_KEY_ID_LEN: usize = 16;

/// Domain separation of the index digest (as the unkeyed digest had, see
/// [`crate::code::digest`]).
const DIGEST_PREFIX: &[u8] = b"kamigate/code/v1\0";

/// What check values seal or digest ([`Keyring::data_check`], [`Keyring::index_check`]),
/// under a key id no key of a SKU has (SKU names are never empty).
const CHECK_TEXT: &str = "kamigate key check";
const CHECK_ID: &str = "check";

/// Domain separation of the associated data.
const AAD_PREFIX: &[u8] = b"kamigate/seal/v1\0";

/// Why a stored code could not be opened. Names key ids, never a code or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Sealed under a data key this gateway does not have.
    #[error("sealed under data key {0}, which is not in the keyring")]
    UnknownKey(String),
    /// The ciphertext does not open under its key with its SKU and key id: tampered with,
    /// corrupted, or moved from another key.
    #[error(
        "does not open under data key {0}: tampered with, corrupted or moved from another key"
    )]
    Tampered(String),
    /// Not in the sealed form at all (a plaintext left from before encryption, or garbage).
    #[error("is not sealed")]
    NotSealed,
}

impl OpenError {
    /// The data key the text named, when it named one (for logs and metrics).
    pub fn key_id(&self) -> &str {
        match self {
            OpenError::UnknownKey(id) | OpenError::Tampered(id) => id,
            OpenError::NotSealed => "",
        }
    }
}

/// Why a keyring could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyringError(pub String);

/// One data key: seals codes, or (when not current) only opens what it sealed before.
struct DataKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The keys of a gateway. Its `Debug` shows key ids only.
pub struct Keyring {
    /// The first one seals; all of them open.
    data: Vec<DataKey>,
    index_id: String,
    /// HMAC keyed with the index key, cloned per digest (keying costs two hash blocks).
    index: Hmac<Sha256>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current_id())
            .field("data", &self.data_ids())
            .field("index", &self.index_id)
            .finish()
    }
}

/// A key id: short, lower-case letters and digits, starting with a letter.
pub fn check_key_id(id: &str) -> Result<(), KeyringError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id.as_bytes()[0].is_ascii_lowercase()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(KeyringError(format!(
            "key id {id:?} must be 1 to {MAX_KEY_ID_LEN} lower-case letters and digits, \
             starting with a letter"
        )))
    }
}

impl Keyring {
    /// A keyring of `data` keys (the first seals) and one index key. Ids must be distinct.
    pub fn new(
        data: &[(&str, [u8; KEY_LEN])],
        index: (&str, [u8; KEY_LEN]),
    ) -> Result<Keyring, KeyringError> {
        if data.is_empty() {
            return Err(KeyringError("no data key".into()));
        }
        check_key_id(index.0)?;
        let mut keys = Vec::with_capacity(data.len());
        for (id, key) in data {
            check_key_id(id)?;
            if *id == index.0 || keys.iter().any(|k: &DataKey| k.id == *id) {
                return Err(KeyringError(format!("key id {id} is used twice")));
            }
            keys.push(DataKey {
                id: (*id).to_owned(),
                cipher: XChaCha20Poly1305::new(key.into()),
            });
        }
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(&index.1)
            .map_err(|_| KeyringError("the index key cannot key HMAC".into()))?;
        Ok(Keyring {
            data: keys,
            index_id: index.0.to_owned(),
            index: mac,
        })
    }

    /// A keyring of fresh random keys (`d1`, `i1`): what a first start generates, and what an
    /// inventory without a configured keyring uses (tests).
    pub fn generate() -> Keyring {
        Keyring::new(&[("d1", rand::random())], ("i1", rand::random()))
            .expect("fixed ids are valid and distinct")
    }

    /// The id of the data key that seals.
    pub fn current_id(&self) -> &str {
        &self.data[0].id
    }

    /// Every data key's id, the sealing one first.
    pub fn data_ids(&self) -> Vec<&str> {
        self.data.iter().map(|k| k.id.as_str()).collect()
    }

    /// The index key's id.
    pub fn index_id(&self) -> &str {
        &self.index_id
    }

    /// Seals `code` for key `local_id` of `sku` under the current data key.
    pub fn seal(&self, sku: &str, local_id: &str, code: &str) -> String {
        seal_with(&self.data[0], sku, local_id, code)
    }

    /// A check value for data key `id` ([`Keyring::opens_check`]), `None` if the keyring
    /// lacks it: a constant sealed under that key.
    pub fn data_check(&self, id: &str) -> Option<String> {
        let key = self.data.iter().find(|k| k.id == id)?;
        Some(seal_with(key, "", CHECK_ID, CHECK_TEXT))
    }

    /// Opens what [`Keyring::seal`] made for key `local_id` of `sku`.
    pub fn open(&self, sku: &str, local_id: &str, stored: &str) -> Result<String, OpenError> {
        let (key_id, body) = sealed_parts(stored).ok_or(OpenError::NotSealed)?;
        let key = self
            .data
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| OpenError::UnknownKey(key_id.to_owned()))?;
        let tampered = || OpenError::Tampered(key_id.to_owned());
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| tampered())?;
        if raw.len() < NONCE_LEN {
            return Err(tampered());
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let aad = aad(sku, local_id);
        let plain = key
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| tampered())?;
        String::from_utf8(plain).map_err(|_| tampered())
    }

    /// Whether `check` (made by [`Keyring::data_check`]) opens under this keyring: the data
    /// key of its id is the same key material.
    pub fn opens_check(&self, check: &str) -> bool {
        self.open("", CHECK_ID, check).as_deref() == Ok(CHECK_TEXT)
    }

    /// The index key's check value: the digest of a constant.
    pub fn index_check(&self) -> String {
        self.digest(CHECK_TEXT)
    }

    /// Whether `stored` is sealed under the current data key (nothing for a rekey to do).
    pub fn is_current(&self, stored: &str) -> bool {
        sealed_parts(stored).is_some_and(|(id, _)| id == self.current_id())
    }

    /// The keyed digest of a canonical code: `<index key id>.<hex HMAC-SHA-256>`.
    pub fn digest(&self, canonical: &str) -> String {
        let mut mac = self.index.clone();
        mac.update(DIGEST_PREFIX);
        mac.update(canonical.as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut out = String::with_capacity(self.index_id.len() + 1 + tag.len() * 2);
        out.push_str(&self.index_id);
        out.push('.');
        out.push_str(&hex::encode(tag));
        out
    }

    /// Whether `digest` was made by [`Keyring::digest`] under this index key.
    pub fn is_current_digest(&self, digest: &str) -> bool {
        digest
            .split_once('.')
            .is_some_and(|(id, _)| id == self.index_id)
    }
}

/// The data key id and the encoded body of a sealed text, or `None` if it is not sealed.
pub fn sealed_parts(stored: &str) -> Option<(&str, &str)> {
    stored.strip_prefix(SEALED_PREFIX)?.split_once('.')
}

/// Whether `stored` is in the sealed form (under any key).
pub fn is_sealed(stored: &str) -> bool {
    sealed_parts(stored).is_some()
}

/// Seals `code` for key `local_id` of `sku` under `key`.
fn seal_with(key: &DataKey, sku: &str, local_id: &str, code: &str) -> String {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let aad = aad(sku, local_id);
    let sealed = key
        .cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: code.as_bytes(),
                aad: &aad,
            },
        )
        .expect("XChaCha20-Poly1305 seals any message shorter than 256 GiB");
    let mut raw = Vec::with_capacity(NONCE_LEN + sealed.len());
    raw.extend_from_slice(&nonce);
    raw.extend_from_slice(&sealed);
    let mut out = String::with_capacity(SEALED_PREFIX.len() + key.id.len() + 1 + raw.len() * 2);
    out.push_str(SEALED_PREFIX);
    out.push_str(&key.id);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(&raw, &mut out);
    out
}

/// The associated data binding a ciphertext to its SKU and key: SKU names hold no NUL.
fn aad(sku: &str, local_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_PREFIX.len() + sku.len() + 1 + local_id.len());
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(sku.as_bytes());
    aad.push(0);
    aad.extend_from_slice(local_id.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new(&[("d2", [2; 32]), ("d1", [1; 32])], ("i1", [9; 32])).expect("valid")
    }

    #[test]
    fn a_sealed_code_opens_for_its_key_only() {
        let k = ring();
        let s = k.seal("gift", "7", "ABCD1234");
        assert!(s.starts_with("e1.d2."), "{s}");
        assert!(!s.contains("ABCD1234"));
        assert_eq!(k.open("gift", "7", &s).as_deref(), Ok("ABCD1234"));
        assert_eq!(
            k.open("gift", "8", &s),
            Err(OpenError::Tampered("d2".into()))
        );
        assert_eq!(
            k.open("gifts", "7", &s),
            Err(OpenError::Tampered("d2".into()))
        );
        // Two seals of one code differ (fresh nonce).
        assert_ne!(s, k.seal("gift", "7", "ABCD1234"));
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let k = ring();
        let s = k.seal("gift", "1", "CODE");
        for i in SEALED_PREFIX.len() + 3..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(b).expect("ascii");
            if t != s {
                assert!(k.open("gift", "1", &t).is_err(), "position {i}");
            }
        }
    }

    #[test]
    fn old_keys_open_and_unknown_keys_are_named() {
        let old = Keyring::new(&[("d1", [1; 32])], ("i1", [9; 32])).expect("valid");
        let s = old.seal("gift", "1", "CODE");
        let k = ring();
        assert!(!k.is_current(&s));
        assert_eq!(k.open("gift", "1", &s).as_deref(), Ok("CODE"));
        let other = Keyring::new(&[("d9", [1; 32])], ("i1", [9; 32])).expect("valid");
        let err = other.open("gift", "1", &s).expect_err("no d1");
        assert_eq!(err, OpenError::UnknownKey("d1".into()));
        assert!(err.to_string().contains("d1"));
        assert_eq!(k.open("gift", "1", "CODE"), Err(OpenError::NotSealed));
    }

    #[test]
    fn the_digest_is_keyed_and_names_its_key() {
        let k = ring();
        let d = k.digest("ABCD");
        assert!(d.starts_with("i1."));
        assert_eq!(d.len(), 3 + 64);
        assert!(k.is_current_digest(&d));
        let other = Keyring::new(&[("d1", [1; 32])], ("i1", [8; 32])).expect("valid");
        assert_ne!(other.digest("ABCD"), d);
        assert_ne!(&d[3..], crate::code::digest("ABCD"));
    }

    #[test]
    fn debug_shows_ids_not_keys() {
        let text = format!("{:?}", ring());
        assert!(text.contains("d2") && text.contains("i1"), "{text}");
        assert!(!text.contains("[2, 2") && !text.contains("0202"), "{text}");
    }

    #[test]
    fn key_ids_are_checked() {
        assert!(check_key_id("d1").is_ok());
        for bad in ["", "1d", "D1", "d.1", "d-1", "abcdefghijklmnopq"] {
            assert!(check_key_id(bad).is_err(), "{bad}");
        }
        assert!(Keyring::new(&[("d1", [0; 32])], ("d1", [0; 32])).is_err());
    }
}
