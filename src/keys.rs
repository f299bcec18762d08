//! The secret keys behind the keyed hashes (HMAC) the state keeps instead of identifiers,
//! and behind the sealing of what dead letters must keep in clear.
//!
//! Keys form a ring: the first is current (new ledger entries, new seals), the others are
//! older keys still needed to look up what was written under them. The ring comes from an
//! environment variable or a key file (hex keys, one per line or separated by commas,
//! current first). A key file is generated only when the state file does not exist yet
//! (see [`crate::state`]): a lost key is never silently replaced.

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a sealed value does not open with any key of the ring (wrong key, or tampered)")]
    Unseal,
    #[error("environment variable {var} must hold keys of at least 32 bytes as hex, current first, separated by commas")]
    BadEnv { var: String },
    #[error("environment variable {var} (named by [state] key_env) is not set")]
    MissingEnv { var: String },
    #[error("key file {path}: {message}")]
    File { path: PathBuf, message: String },
}

#[derive(Clone)]
pub struct Keys {
    /// Current key first.
    secrets: Vec<Vec<u8>>,
}

/// Where the ring comes from: `[state] key_env`, else `[state] key_file`.
#[derive(Debug, Clone, Copy)]
pub struct KeySource<'a> {
    pub env: Option<&'a str>,
    pub file: &'a Path,
}

impl std::fmt::Display for KeySource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.env {
            Some(var) => write!(f, "environment variable {var}"),
            None => write!(f, "key file {}", self.file.display()),
        }
    }
}

impl Keys {
    /// Loads the ring; `None` when the key file does not exist (it is never created here).
    pub fn load(source: KeySource) -> Result<Option<Self>, KeyError> {
        if let Some(var) = source.env {
            let text = std::env::var(var).map_err(|_| KeyError::MissingEnv {
                var: var.to_owned(),
            })?;
            return match parse_ring(&text) {
                Some(secrets) => Ok(Some(Self { secrets })),
                None => Err(KeyError::BadEnv {
                    var: var.to_owned(),
                }),
            };
        }
        let file_err = |message: String| KeyError::File {
            path: source.file.to_owned(),
            message,
        };
        match std::fs::read_to_string(source.file) {
            Ok(text) => match parse_ring(&text) {
                Some(secrets) => Ok(Some(Self { secrets })),
                None => Err(file_err(
                    "does not hold hex keys of at least 32 bytes, one per line: restore the key file that belongs to the state".into(),
                )),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_err(e.to_string())),
        }
    }

    /// Generates a new key file (mode 0600) for a state file that does not exist yet.
    pub fn generate(file: &Path) -> Result<Self, KeyError> {
        let keys = Self {
            secrets: vec![new_secret()],
        };
        write_private(file, &keys.ring_text(), false).map_err(|e| KeyError::File {
            path: file.to_owned(),
            message: e.to_string(),
        })?;
        tracing::warn!(event = "key_generated", path = %file.display(), "generated a new state key; back it up with the state file (without it the state cannot be used)");
        Ok(keys)
    }

    /// A ring with a new current key in front of these ones.
    pub fn rotated(&self) -> Self {
        let mut secrets = vec![new_secret()];
        secrets.extend(self.secrets.iter().cloned());
        Self { secrets }
    }

    /// The ring as a key file holds it: hex keys, one per line, current first.
    pub fn ring_text(&self) -> String {
        self.secrets.iter().map(|s| hex::encode(s) + "\n").collect()
    }

    /// Replaces a key file with this ring, atomically (a new 0600 file renamed over it).
    pub fn write_ring(&self, file: &Path) -> Result<(), KeyError> {
        write_private(file, &self.ring_text(), true).map_err(|e| KeyError::File {
            path: file.to_owned(),
            message: e.to_string(),
        })
    }

    /// Fingerprints of every key of the ring, current first: what the state records to tell
    /// its keys from any other.
    pub fn fingerprints(&self) -> Vec<String> {
        self.secrets
            .iter()
            .map(|s| hex::encode(&derive(s, b"fingerprint")[..8]))
            .collect()
    }

    /// Encrypts what a dead letter must keep in clear to be retried (AES-256-GCM under the
    /// current key, a fresh nonce each time), bound to `context` (the letter's id and kind:
    /// a sealed value moved to another letter does not open); hex of nonce and ciphertext.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> String {
        use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
        let cipher = aes_gcm::Aes256Gcm::new(&derive(&self.secrets[0], b"seal").into());
        let nonce = aes_gcm::Aes256Gcm::generate_nonce(&mut OsRng);
        let payload = Payload {
            msg: plaintext,
            aad: context,
        };
        let mut sealed = nonce.to_vec();
        sealed.extend(
            cipher
                .encrypt(&nonce, payload)
                .expect("AES-GCM encrypts any input"),
        );
        hex::encode(sealed)
    }

    /// Opens a sealed value with whichever key of the ring sealed it.
    pub fn unseal(&self, sealed: &str, context: &[u8]) -> Result<Vec<u8>, KeyError> {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let bytes = hex::decode(sealed).map_err(|_| KeyError::Unseal)?;
        if bytes.len() < 12 {
            return Err(KeyError::Unseal);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        self.secrets
            .iter()
            .find_map(|secret| {
                let cipher = aes_gcm::Aes256Gcm::new(&derive(secret, b"seal").into());
                let payload = Payload {
                    msg: ciphertext,
                    aad: context,
                };
                cipher
                    .decrypt(aes_gcm::Nonce::from_slice(nonce), payload)
                    .ok()
            })
            .ok_or(KeyError::Unseal)
    }

    /// The keyed hash that identifies a request `(action, key)` from now on (current key).
    pub fn request_id(&self, action: &str, key: &str) -> [u8; 32] {
        request_id(&self.secrets[0], action, key)
    }

    /// The request's keyed hash under every key of the ring, current first: what lookups
    /// search for, so requests done before a key rotation are still found.
    pub fn request_ids(&self, action: &str, key: &str) -> Vec<[u8; 32]> {
        self.secrets
            .iter()
            .map(|s| request_id(s, action, key))
            .collect()
    }
}

impl Keys {
    /// The keyed hash of a request's key under every key of the ring, current first: a
    /// request's record (all its actions) is kept under it.
    pub fn request_key_ids(&self, key: &str) -> Vec<[u8; 32]> {
        self.request_ids("\u{0}request", key)
    }
}

fn new_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    secret
}

/// Hex keys separated by newlines, commas or spaces; `None` unless every one is at least 32
/// bytes and there is at least one.
fn parse_ring(text: &str) -> Option<Vec<Vec<u8>>> {
    let secrets: Vec<Vec<u8>> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| hex::decode(s).ok().filter(|k| k.len() >= 32))
        .collect::<Option<_>>()?;
    (!secrets.is_empty()).then_some(secrets)
}

/// A 32-byte key for one purpose, derived from a secret.
fn derive(secret: &[u8], purpose: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(purpose);
    mac.finalize().into_bytes().into()
}

fn request_id(secret: &[u8], action: &str, key: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(b"dedup\n");
    mac.update(action.as_bytes());
    mac.update(b"\n");
    mac.update(key.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Writes a file readable by its owner only: a new one (failing if it exists), or, with
/// `replace`, a temporary file renamed over the old one.
fn write_private(path: &Path, text: &str, replace: bool) -> std::io::Result<()> {
    let target = path.to_owned();
    let path = if replace {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        tmp
    } else {
        path.to_owned()
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    if replace {
        std::fs::rename(&path, &target)?;
    }
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &Path) -> KeySource<'_> {
        KeySource {
            env: None,
            file: path,
        }
    }

    #[test]
    fn generates_a_private_key_once_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb.key");
        assert!(
            Keys::load(file(&path)).unwrap().is_none(),
            "never created by a load"
        );
        let a = Keys::generate(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            Keys::generate(&path).is_err(),
            "an existing key is never replaced"
        );
        let b = Keys::load(file(&path)).unwrap().unwrap();
        assert_eq!(a.request_id("a", "k"), b.request_id("a", "k"));
        assert_ne!(a.request_id("a", "k"), a.request_id("a", "k2"));
        assert_eq!(a.fingerprints(), b.fingerprints());
    }

    #[test]
    fn a_key_file_that_is_not_a_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        for text in ["", "not hex", "abcd", &format!("{}\nzz", "00".repeat(32))] {
            std::fs::write(&path, text).unwrap();
            assert!(Keys::load(file(&path)).is_err(), "{text:?}");
        }
    }

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keys::generate(&dir.path().join("a.key")).unwrap();
        let b = Keys::generate(&dir.path().join("b.key")).unwrap();
        let sealed = a.seal(b"user u-123", b"1 action_failed");
        assert!(!sealed.contains(&hex::encode(b"u-123")));
        assert_ne!(
            sealed,
            a.seal(b"user u-123", b"1 action_failed"),
            "a fresh nonce each time"
        );
        assert_eq!(
            a.unseal(&sealed, b"1 action_failed").unwrap(),
            b"user u-123"
        );
        assert!(b.unseal(&sealed, b"1 action_failed").is_err());
        assert!(
            a.unseal(&sealed, b"2 action_failed").is_err(),
            "bound to its letter"
        );
    }

    #[test]
    fn a_rotated_ring_reads_what_the_old_key_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let old = Keys::generate(&path).unwrap();
        let sealed = old.seal(b"x", b"c");
        let ring = old.rotated();
        ring.write_ring(&path).unwrap();
        let ring = Keys::load(file(&path)).unwrap().unwrap();
        assert_eq!(ring.unseal(&sealed, b"c").unwrap(), b"x");
        assert_ne!(ring.request_id("a", "k"), old.request_id("a", "k"));
        assert!(ring
            .request_ids("a", "k")
            .contains(&old.request_id("a", "k")));
        assert_eq!(ring.fingerprints()[1..], old.fingerprints()[..]);
    }
}
