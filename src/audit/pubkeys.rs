//! The auditor's public-key file (TOML): the audit keys by key id, and the institutions' keys
//! whose signatures on inbound messages the verifier re-checks.
//!
//! ```toml
//! [audit_keys]
//! audit-2026a = { pem_file = "keys/audit-2026a.pub.pem" }    # relative to this file
//! audit-2026b = { pem = """
//! -----BEGIN PUBLIC KEY-----
//! ...
//! -----END PUBLIC KEY-----
//! """ }
//!
//! [institutions.TENPAY]
//! pem_file = "keys/tenpay.pub.pem"
//! distid = "1234567812345678"        # the default
//! format = "der"                     # der (default) or raw (r||s, 64 bytes)
//!
//! [[institutions.ALIPAY]]            # several keys (e.g. across a key change): any may match
//! pem_file = "keys/alipay-2025.pem"
//! [[institutions.ALIPAY]]
//! pem_file = "keys/alipay-2026.pem"
//! ```
//!
//! Owns: reading and checking that file. Must never: accept an unknown key (a typo such as
//! `distId` would silently fall back to a default), or a private key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::record::{MAX_KEY_ID_LEN, check_identifier};
use crate::crypto::{DEFAULT_DISTID, PublicKey, SignatureFormat, Verifier, load_public_key};

const MAX_PUBKEYS_FILE_LEN: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("public-key file {}: {reason}", path.display())]
pub struct PubkeysError {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLayout {
    #[serde(default)]
    audit_keys: BTreeMap<String, KeySource>,
    #[serde(default)]
    /// A table, or an array of tables for an institution with several keys.
    institutions: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeySource {
    pem_file: Option<PathBuf>,
    pem: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstitutionEntry {
    pem_file: Option<PathBuf>,
    pem: Option<String>,
    distid: Option<String>,
    format: Option<String>,
}

/// One key of an institution, with how that institution signs.
#[derive(Clone, Debug)]
pub struct InstitutionKey {
    pub verifier: Verifier,
    pub format: SignatureFormat,
}

/// The keys the verifier trusts.
#[derive(Clone, Debug, Default)]
pub struct Pubkeys {
    /// Audit keys by key id; checkpoints are verified with distinguishing id 1234567812345678.
    pub audit_keys: BTreeMap<String, Verifier>,
    pub institutions: BTreeMap<String, Vec<InstitutionKey>>,
}

impl Pubkeys {
    pub fn load(path: &Path) -> Result<Self, PubkeysError> {
        let error = |reason: String| PubkeysError {
            path: path.to_owned(),
            reason,
        };
        let metadata = std::fs::metadata(path).map_err(|e| error(e.to_string()))?;
        if metadata.len() > MAX_PUBKEYS_FILE_LEN {
            return Err(error(format!(
                "{} bytes; a public-key file is far smaller",
                metadata.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(error)
    }

    /// Parses the TOML text; relative `pem_file` paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let layout: FileLayout = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut keys = Pubkeys::default();
        for (key_id, source) in layout.audit_keys {
            check_identifier("key id", &key_id, MAX_KEY_ID_LEN)
                .map_err(|e| format!("[audit_keys] {e}"))?;
            let public = read_key(base, source.pem_file, source.pem)
                .map_err(|e| format!("[audit_keys] {key_id}: {e}"))?;
            let verifier =
                Verifier::new(&public, DEFAULT_DISTID).map_err(|e| format!("{key_id}: {e}"))?;
            keys.audit_keys.insert(key_id, verifier);
        }
        for (institution, entries) in layout.institutions {
            let entries: Vec<InstitutionEntry> = if entries.is_array() {
                entries.try_into()
            } else {
                entries.try_into().map(|entry| vec![entry])
            }
            .map_err(|e: toml::de::Error| format!("[institutions.{institution}] {e}"))?;
            if entries.is_empty() {
                return Err(format!("[institutions.{institution}] lists no key"));
            }
            let mut list = Vec::with_capacity(entries.len());
            for entry in entries {
                let at = |e: String| format!("[institutions.{institution}] {e}");
                let public = read_key(base, entry.pem_file, entry.pem).map_err(at)?;
                let distid = entry.distid.as_deref().unwrap_or(DEFAULT_DISTID);
                let verifier = Verifier::new(&public, distid).map_err(|e| at(e.to_string()))?;
                let format = entry
                    .format
                    .as_deref()
                    .unwrap_or("der")
                    .parse::<SignatureFormat>()
                    .map_err(|e| at(format!("format: {e}")))?;
                list.push(InstitutionKey { verifier, format });
            }
            keys.institutions.insert(institution, list);
        }
        Ok(keys)
    }
}

fn read_key(
    base: &Path,
    pem_file: Option<PathBuf>,
    pem: Option<String>,
) -> Result<PublicKey, String> {
    match (pem_file, pem) {
        (Some(file), None) => load_public_key(&base.join(file)).map_err(|e| e.to_string()),
        (None, Some(text)) => PublicKey::from_public_key_pem(&text).map_err(|e| e.to_string()),
        _ => Err("give exactly one of pem_file = \"PATH\" or pem = \"\"\"...\"\"\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PrivateKey;

    #[test]
    fn inline_and_list_forms_parse_and_typos_are_refused() {
        let key = PrivateKey::generate().unwrap();
        let pem = key.public_key().to_public_key_pem().unwrap();
        let text = format!(
            "[audit_keys]\na1 = {{ pem = \"\"\"\n{pem}\"\"\" }}\n\n\
             [institutions.TENPAY]\npem = \"\"\"\n{pem}\"\"\"\nformat = \"raw\"\n\n\
             [[institutions.ALIPAY]]\npem = \"\"\"\n{pem}\"\"\"\n\
             [[institutions.ALIPAY]]\npem = \"\"\"\n{pem}\"\"\"\ndistid = \"42\"\n"
        );
        let keys = Pubkeys::parse(&text, Path::new(".")).unwrap();
        assert!(keys.audit_keys.contains_key("a1"));
        assert_eq!(keys.institutions["TENPAY"][0].format, SignatureFormat::Raw);
        assert_eq!(keys.institutions["ALIPAY"].len(), 2);
        assert_eq!(keys.institutions["ALIPAY"][1].verifier.distid(), "42");

        let typo = text.replace("format = \"raw\"", "fromat = \"raw\"");
        assert!(Pubkeys::parse(&typo, Path::new(".")).is_err());
        let both = "[audit_keys]\na1 = { pem_file = \"x\", pem = \"y\" }\n";
        assert!(Pubkeys::parse(both, Path::new(".")).is_err());
        let bad_id = format!("[audit_keys]\n\"a/1\" = {{ pem = \"\"\"\n{pem}\"\"\" }}\n");
        assert!(Pubkeys::parse(&bad_id, Path::new(".")).is_err());
    }
}
