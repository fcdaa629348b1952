//! Reading and writing SM2 key files for the daemon.
//!
//! Owns the on-disk rules: private keys and passphrase files must not be accessible to group or
//! others, encrypted keys need a configured passphrase (from a file or a systemd credential), and
//! new key files are created exclusively (never overwriting an existing key) with their final
//! mode from the start. Every error names the file and says how to fix the problem.
//!
//! Must never: include key bytes or passphrases in errors, follow a passphrase into a log, or
//! write a private key with a mode wider than 0600 even for an instant.

use std::fmt;
use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::CryptoError;
use super::sm2::{PrivateKey, PublicKey};

/// A PEM key is a few hundred bytes; anything this large is the wrong file.
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;
const MAX_PASSPHRASE_FILE_LEN: u64 = 4 * 1024;

const PRIVATE_KEY_MODE: u32 = 0o600;
const PUBLIC_KEY_MODE: u32 = 0o644;
/// Group and other permission bits: any of them on a secret file means someone else can read or
/// replace it.
const GROUP_OTHER_BITS: u32 = 0o077;

const KIND_PRIVATE_KEY: &str = "private key";
const KIND_PUBLIC_KEY: &str = "public key";
const KIND_PASSPHRASE_FILE: &str = "passphrase file";
const KIND_CREDENTIAL: &str = "systemd credential";

/// Where the passphrase of an encrypted private key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassphraseSource {
    /// A file holding the passphrase (one trailing newline is ignored). Must be mode 0600/0400.
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>`, provided by `LoadCredential=` or
    /// `LoadCredentialEncrypted=` in the unit.
    Credential(String),
}

impl PassphraseSource {
    /// Reads the passphrase into a buffer that is wiped on drop.
    pub fn read(&self) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
        match self {
            PassphraseSource::File(path) => read_passphrase(KIND_PASSPHRASE_FILE, path, self),
            PassphraseSource::Credential(name) => {
                let directory = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
                read_credential(directory.as_deref(), name, self)
            }
        }
    }
}

impl fmt::Display for PassphraseSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PassphraseSource::File(path) => {
                write!(f, "{KIND_PASSPHRASE_FILE} {}", path.display())
            }
            PassphraseSource::Credential(name) => write!(f, "{KIND_CREDENTIAL} \"{name}\""),
        }
    }
}

/// Why a key file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    #[error("cannot open {kind} {}: {source}", path.display())]
    Open {
        kind: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error("cannot read {kind} {}: {source}", path.display())]
    Read {
        kind: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error("{kind} {} is not a regular file", path.display())]
    NotRegularFile { kind: &'static str, path: PathBuf },

    #[error(
        "{kind} {} is larger than {max} bytes, far more than a {kind} can be; check the path",
        path.display()
    )]
    TooLarge {
        kind: &'static str,
        path: PathBuf,
        max: u64,
    },

    #[error("{kind} {} is not UTF-8 text (expected PEM)", path.display())]
    NotText { kind: &'static str, path: PathBuf },

    #[error(
        "refusing to use {kind} {path}: its mode is {mode:04o}, which lets group or others \
         access it; run `chmod 0600 {path}` and `chown kunpay {path}` (or whichever account the \
         daemon runs as)",
        path = path.display()
    )]
    InsecurePermissions {
        kind: &'static str,
        path: PathBuf,
        mode: u32,
    },

    #[error(
        "private key {} is encrypted; set {config_key}.passphrase_file or \
         {config_key}.passphrase_credential",
        path.display()
    )]
    PassphraseRequired { path: PathBuf, config_key: String },

    #[error(
        "private key {} is not encrypted, but {config_key} configures a passphrase \
         ({passphrase_source}); remove the passphrase setting, or encrypt the key with \
         `openssl pkcs8 -topk8 -v2 aes-256-cbc -v2prf hmacWithSHA256 -in KEY -out KEY.enc`",
        path.display()
    )]
    PassphraseNotNeeded {
        path: PathBuf,
        config_key: String,
        passphrase_source: String,
    },

    #[error(
        "wrong passphrase for private key {} (passphrase from {passphrase_source}), or the \
         encrypted key is corrupted",
        path.display()
    )]
    WrongPassphrase {
        path: PathBuf,
        passphrase_source: String,
    },

    #[error(
        "cannot read systemd credential \"{name}\": $CREDENTIALS_DIRECTORY is not set; the \
         kunpay unit needs `LoadCredential={name}:/path/to/passphrase` (or \
         `LoadCredentialEncrypted={name}:...`)"
    )]
    CredentialsDirectoryUnset { name: String },

    #[error("invalid systemd credential name {name:?}: {reason}")]
    InvalidCredentialName { name: String, reason: &'static str },

    #[error("{passphrase_source} is empty")]
    EmptyPassphrase { passphrase_source: String },

    #[error("{kind} {}: {source}", path.display())]
    Key {
        kind: &'static str,
        path: PathBuf,
        source: CryptoError,
    },

    #[error(
        "refusing to overwrite existing file {}; move it away first if you really mean to \
         replace that key",
        path.display()
    )]
    AlreadyExists { path: PathBuf },

    #[error("cannot write {kind} {}: {source}", path.display())]
    Write {
        kind: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Loads the daemon's SM2 private key. `config_key` is the configuration table the key came
/// from (e.g. `keys.signing`), so that errors can say which setting to change.
pub fn load_private_key(
    path: &Path,
    passphrase: Option<&PassphraseSource>,
    config_key: &str,
) -> Result<PrivateKey, KeyFileError> {
    let contents = read_secret_file(KIND_PRIVATE_KEY, path, MAX_KEY_FILE_LEN)?;
    let pem_text = std::str::from_utf8(&contents).map_err(|_| KeyFileError::NotText {
        kind: KIND_PRIVATE_KEY,
        path: path.to_owned(),
    })?;
    let key_error = |source| KeyFileError::Key {
        kind: KIND_PRIVATE_KEY,
        path: path.to_owned(),
        source,
    };
    match passphrase {
        None => PrivateKey::from_pkcs8_pem(pem_text).map_err(|error| match error {
            CryptoError::KeyIsEncrypted => KeyFileError::PassphraseRequired {
                path: path.to_owned(),
                config_key: config_key.to_owned(),
            },
            other => key_error(other),
        }),
        Some(source) => {
            let passphrase = source.read()?;
            PrivateKey::from_pkcs8_encrypted_pem(pem_text, &passphrase).map_err(|error| match error
            {
                CryptoError::KeyIsNotEncrypted => KeyFileError::PassphraseNotNeeded {
                    path: path.to_owned(),
                    config_key: config_key.to_owned(),
                    passphrase_source: source.to_string(),
                },
                CryptoError::WrongPassphrase => KeyFileError::WrongPassphrase {
                    path: path.to_owned(),
                    passphrase_source: source.to_string(),
                },
                other => key_error(other),
            })
        }
    }
}

/// Loads an SM2 public key (SPKI `PUBLIC KEY` PEM), e.g. a counterparty's verification key.
pub fn load_public_key(path: &Path) -> Result<PublicKey, KeyFileError> {
    let (file, metadata) = open_regular_file(KIND_PUBLIC_KEY, path)?;
    let contents = read_limited(KIND_PUBLIC_KEY, path, &file, &metadata, MAX_KEY_FILE_LEN)?;
    let pem_text = std::str::from_utf8(&contents).map_err(|_| KeyFileError::NotText {
        kind: KIND_PUBLIC_KEY,
        path: path.to_owned(),
    })?;
    PublicKey::from_public_key_pem(pem_text).map_err(|source| KeyFileError::Key {
        kind: KIND_PUBLIC_KEY,
        path: path.to_owned(),
        source,
    })
}

/// Writes a new private key file with mode 0600, encrypted (PBES2/PBKDF2-SHA256/AES-256-CBC)
/// if a passphrase is given. Refuses to replace an existing file; the file appears complete or
/// not at all.
pub fn write_private_key(
    path: &Path,
    key: &PrivateKey,
    passphrase: Option<&[u8]>,
) -> Result<(), KeyFileError> {
    let pem_text = match passphrase {
        Some(passphrase) => key.to_pkcs8_encrypted_pem(passphrase),
        None => key.to_pkcs8_pem(),
    }
    .map_err(|source| KeyFileError::Key {
        kind: KIND_PRIVATE_KEY,
        path: path.to_owned(),
        source,
    })?;
    write_new_file(
        KIND_PRIVATE_KEY,
        path,
        pem_text.as_bytes(),
        PRIVATE_KEY_MODE,
    )
}

/// Writes a new public key file with mode 0644. Refuses to replace an existing file.
pub fn write_public_key(path: &Path, key: &PublicKey) -> Result<(), KeyFileError> {
    let pem_text = key
        .to_public_key_pem()
        .map_err(|source| KeyFileError::Key {
            kind: KIND_PUBLIC_KEY,
            path: path.to_owned(),
            source,
        })?;
    write_new_file(KIND_PUBLIC_KEY, path, pem_text.as_bytes(), PUBLIC_KEY_MODE)
}

fn read_credential(
    credentials_directory: Option<&Path>,
    name: &str,
    source: &PassphraseSource,
) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let invalid = |reason| KeyFileError::InvalidCredentialName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(invalid(
            "it must be a plain file name inside $CREDENTIALS_DIRECTORY",
        ));
    }
    let directory =
        credentials_directory.ok_or_else(|| KeyFileError::CredentialsDirectoryUnset {
            name: name.to_owned(),
        })?;
    read_passphrase(KIND_CREDENTIAL, &directory.join(name), source)
}

fn read_passphrase(
    kind: &'static str,
    path: &Path,
    source: &PassphraseSource,
) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let mut passphrase = read_secret_file(kind, path, MAX_PASSPHRASE_FILE_LEN)?;
    // `echo secret > file` adds a newline that is not part of the passphrase (OpenSSL's
    // `-pass file:` reads only the first line for the same reason).
    if passphrase.last() == Some(&b'\n') {
        passphrase.pop();
        if passphrase.last() == Some(&b'\r') {
            passphrase.pop();
        }
    }
    if passphrase.is_empty() {
        return Err(KeyFileError::EmptyPassphrase {
            passphrase_source: source.to_string(),
        });
    }
    Ok(passphrase)
}

/// Opens a secret file and refuses it unless only its owner can access it. The mode is checked
/// on the opened descriptor, so the file cannot be swapped between check and read.
fn read_secret_file(
    kind: &'static str,
    path: &Path,
    max_len: u64,
) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let (file, metadata) = open_regular_file(kind, path)?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(KeyFileError::InsecurePermissions {
            kind,
            path: path.to_owned(),
            mode,
        });
    }
    read_limited(kind, path, &file, &metadata, max_len)
}

fn open_regular_file(kind: &'static str, path: &Path) -> Result<(File, Metadata), KeyFileError> {
    let file = File::open(path).map_err(|source| KeyFileError::Open {
        kind,
        path: path.to_owned(),
        source,
    })?;
    let metadata = file.metadata().map_err(|source| KeyFileError::Read {
        kind,
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(KeyFileError::NotRegularFile {
            kind,
            path: path.to_owned(),
        });
    }
    Ok((file, metadata))
}

fn read_limited(
    kind: &'static str,
    path: &Path,
    file: &File,
    metadata: &Metadata,
    max_len: u64,
) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let too_large = || KeyFileError::TooLarge {
        kind,
        path: path.to_owned(),
        max: max_len,
    };
    if metadata.len() > max_len {
        return Err(too_large());
    }
    // Sized up front so the buffer never reallocates: a reallocation would leave an unwiped copy
    // of the secret in freed memory. The extra byte lets a file that grew be detected.
    let capacity = usize::try_from(metadata.len() + 1).map_err(|_| too_large())?;
    let mut contents = Zeroizing::new(Vec::with_capacity(capacity));
    file.take(max_len + 1)
        .read_to_end(&mut contents)
        .map_err(|source| KeyFileError::Read {
            kind,
            path: path.to_owned(),
            source,
        })?;
    if contents.len() as u64 > max_len {
        return Err(too_large());
    }
    Ok(contents)
}

/// Creates `path` with exactly `contents` and `mode`, or fails without touching an existing file.
/// The data goes to a temporary file in the same directory (created 0600-or-narrower, exclusive)
/// and is then hard-linked into place: `link(2)` fails if the target exists, so there is no
/// window in which a partial key, or a key with a wider mode, is visible under the final name.
fn write_new_file(
    kind: &'static str,
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), KeyFileError> {
    let write_error = |source| KeyFileError::Write {
        kind,
        path: path.to_owned(),
        source,
    };
    if fs::symlink_metadata(path).is_ok() {
        return Err(KeyFileError::AlreadyExists {
            path: path.to_owned(),
        });
    }
    let file_name = path.file_name().ok_or_else(|| {
        write_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path does not end in a file name",
        ))
    })?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut random_suffix = [0u8; 8];
    getrandom::fill(&mut random_suffix).map_err(|error| {
        write_error(io::Error::other(format!(
            "operating-system RNG failed: {error}"
        )))
    })?;
    let temporary_path = directory.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        hex::encode(random_suffix)
    ));

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & PRIVATE_KEY_MODE)
        .open(&temporary_path)
        .map_err(write_error)?;
    // Only a file we created ourselves may be removed by the guard.
    let temporary = TemporaryFile {
        path: temporary_path,
    };
    // The umask may have narrowed the mode; set it exactly (still on the unpublished file).
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    drop(file);

    match fs::hard_link(&temporary.path, path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            return Err(KeyFileError::AlreadyExists {
                path: path.to_owned(),
            });
        }
        Err(error) => return Err(write_error(error)),
    }
    drop(temporary);
    // Make the new directory entry durable before reporting success.
    File::open(directory)
        .and_then(|directory_handle| directory_handle.sync_all())
        .map_err(write_error)
}

/// Removes the temporary file on every exit path, including errors.
struct TemporaryFile {
    path: PathBuf,
}

impl Drop for TemporaryFile {
    fn drop(&mut self) {
        // Nothing useful can be done if removal fails; the name starts with a dot and holds the
        // same data as the final file (or nothing, on early errors).
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_file(path: &Path, contents: &[u8], mode: u32) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn credential_needs_the_systemd_directory() {
        let source = PassphraseSource::Credential("kunpay-signing".into());
        let error = read_credential(None, "kunpay-signing", &source).unwrap_err();
        assert!(
            error.to_string().contains("LoadCredential=kunpay-signing:"),
            "{error}"
        );
    }

    #[test]
    fn credential_names_cannot_escape_the_directory() {
        let directory = tempfile::tempdir().unwrap();
        for name in ["", ".", "..", "../etc/shadow", "a/b"] {
            let source = PassphraseSource::Credential(name.into());
            assert!(matches!(
                read_credential(Some(directory.path()), name, &source),
                Err(KeyFileError::InvalidCredentialName { .. })
            ));
        }
    }

    #[test]
    fn credential_is_read_and_newline_stripped() {
        let directory = tempfile::tempdir().unwrap();
        write_file(&directory.path().join("pass"), b"s3cret\r\n", 0o400);
        let source = PassphraseSource::Credential("pass".into());
        let passphrase = read_credential(Some(directory.path()), "pass", &source).unwrap();
        assert_eq!(passphrase.as_slice(), b"s3cret");

        write_file(&directory.path().join("empty"), b"\n", 0o600);
        let source = PassphraseSource::Credential("empty".into());
        assert!(matches!(
            read_credential(Some(directory.path()), "empty", &source),
            Err(KeyFileError::EmptyPassphrase { .. })
        ));
    }

    #[test]
    fn passphrase_file_with_group_bits_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("pass");
        write_file(&path, b"s3cret\n", 0o640);
        let error = PassphraseSource::File(path.clone()).read().unwrap_err();
        assert!(matches!(
            error,
            KeyFileError::InsecurePermissions { mode: 0o640, .. }
        ));
        assert!(error.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn write_refuses_to_overwrite_and_sets_modes() {
        let directory = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate().unwrap();
        let private_path = directory.path().join("sk.pem");
        let public_path = directory.path().join("pk.pem");
        write_private_key(&private_path, &key, None).unwrap();
        write_public_key(&public_path, &key.public_key()).unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&private_path), 0o600);
        assert_eq!(mode(&public_path), 0o644);

        let before = fs::read(&private_path).unwrap();
        let error =
            write_private_key(&private_path, &PrivateKey::generate().unwrap(), None).unwrap_err();
        assert!(
            matches!(error, KeyFileError::AlreadyExists { .. }),
            "{error}"
        );
        assert_eq!(fs::read(&private_path).unwrap(), before);
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let loaded = load_private_key(&private_path, None, "keys.signing").unwrap();
        assert_eq!(loaded.public_key(), key.public_key());
        assert_eq!(load_public_key(&public_path).unwrap(), key.public_key());
    }

    #[test]
    fn directories_and_missing_files_are_reported_with_the_path() {
        let directory = tempfile::tempdir().unwrap();
        let error = load_public_key(directory.path()).unwrap_err();
        assert!(
            matches!(error, KeyFileError::NotRegularFile { .. }),
            "{error}"
        );
        let missing = directory.path().join("missing.pem");
        let error = load_private_key(&missing, None, "keys.signing").unwrap_err();
        assert!(error.to_string().contains("missing.pem"), "{error}");
    }
}
