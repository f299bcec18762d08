//! The secret key behind the keyed hashes (HMAC) the state keeps instead of identifiers.
//!
//! It comes from an environment variable (hex) or a key file; when neither exists, the
//! daemon generates a key file beside the state file (mode 0600) and says so.

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a sealed value does not open with this state key (wrong key, or corrupt)")]
    Unseal,
    #[error("environment variable {var} must hold a key of at least 32 bytes as hex")]
    BadEnv { var: String },
    #[error("key file {path}: {message}")]
    File { path: PathBuf, message: String },
}

pub struct Keys {
    secret: Vec<u8>,
}

impl Keys {
    /// Loads the key from `env` if named, else from `file`, generating the file if absent.
    pub fn load_or_create(env: Option<&str>, file: &Path) -> Result<Self, KeyError> {
        if let Some(var) = env {
            let bad = || KeyError::BadEnv {
                var: var.to_owned(),
            };
            let text = std::env::var(var).map_err(|_| bad())?;
            let secret = hex::decode(text.trim()).map_err(|_| bad())?;
            if secret.len() < 32 {
                return Err(bad());
            }
            return Ok(Self { secret });
        }
        let file_err = |message: String| KeyError::File {
            path: file.to_owned(),
            message,
        };
        match std::fs::read_to_string(file) {
            Ok(text) => {
                let secret = hex::decode(text.trim())
                    .map_err(|_| file_err("does not hold a hex key".into()))?;
                if secret.len() < 32 {
                    return Err(file_err("the key is shorter than 32 bytes".into()));
                }
                Ok(Self { secret })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = vec![0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut secret);
                write_private(file, &hex::encode(&secret)).map_err(|e| file_err(e.to_string()))?;
                tracing::warn!(path = %file.display(), "generated a new state key; keep it with the state file (losing it forgets which requests were done)");
                Ok(Self { secret })
            }
            Err(e) => Err(file_err(e.to_string())),
        }
    }

    /// Loads an existing key, never creating one (dry-run): `None` when there is none yet.
    pub fn load_existing(env: Option<&str>, file: &Path) -> Result<Option<Self>, KeyError> {
        if env.is_none() && !file.exists() {
            return Ok(None);
        }
        Self::load_or_create(env, file).map(Some)
    }

    /// Encrypts what a dead letter must keep in clear to be retried (AES-256-GCM, a fresh
    /// nonce each time); hex of nonce and ciphertext.
    pub fn seal(&self, plaintext: &[u8]) -> String {
        use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
        let cipher = aes_gcm::Aes256Gcm::new(&self.derived(b"seal").into());
        let nonce = aes_gcm::Aes256Gcm::generate_nonce(&mut OsRng);
        let mut sealed = nonce.to_vec();
        sealed.extend(
            cipher
                .encrypt(&nonce, plaintext)
                .expect("AES-GCM encrypts any input"),
        );
        hex::encode(sealed)
    }

    pub fn unseal(&self, sealed: &str) -> Result<Vec<u8>, KeyError> {
        use aes_gcm::aead::{Aead, KeyInit};
        let bytes = hex::decode(sealed).map_err(|_| KeyError::Unseal)?;
        if bytes.len() < 12 {
            return Err(KeyError::Unseal);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let cipher = aes_gcm::Aes256Gcm::new(&self.derived(b"seal").into());
        cipher
            .decrypt(aes_gcm::Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| KeyError::Unseal)
    }

    /// A 32-byte key for one purpose, derived from the secret.
    fn derived(&self, purpose: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(purpose);
        mac.finalize().into_bytes().into()
    }

    /// The keyed hash that identifies a request `(action, key)` in the dedup set.
    pub fn request_id(&self, action: &str, key: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key");
        mac.update(b"dedup\n");
        mac.update(action.as_bytes());
        mac.update(b"\n");
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Writes a new file readable by its owner only; fails if it exists.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_private_key_once_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb.key");
        let a = Keys::load_or_create(None, &path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let b = Keys::load_or_create(None, &path).unwrap();
        assert_eq!(a.request_id("a", "k"), b.request_id("a", "k"));
        assert_ne!(a.request_id("a", "k"), a.request_id("a", "k2"));
    }

    #[test]
    fn sealed_values_open_only_with_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keys::load_or_create(None, &dir.path().join("a.key")).unwrap();
        let b = Keys::load_or_create(None, &dir.path().join("b.key")).unwrap();
        let sealed = a.seal(b"user u-123");
        assert!(!sealed.contains(&hex::encode(b"u-123")));
        assert_ne!(sealed, a.seal(b"user u-123"), "a fresh nonce each time");
        assert_eq!(a.unseal(&sealed).unwrap(), b"user u-123");
        assert!(b.unseal(&sealed).is_err());
    }
}
