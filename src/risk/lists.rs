//! Black and white lists of cards, id numbers, phones, devices, IP addresses (and CIDR ranges)
//! and merchants, as files under the risk directory (`lists/*.toml`).
//!
//! Owns: parsing list files (errors name the file and line), and membership checks. Card, id
//! and phone values are held only as subject keys (SM3 digests), never as plaintext.
//! Must never: accept a malformed entry silently (an IP that does not parse is an error, not
//! a non-match).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::features::Dimension;
use super::{LoadError, line_of, subject_key};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Black,
    White,
}

impl Colour {
    pub fn name(self) -> &'static str {
        match self {
            Colour::Black => "blacklisted",
            Colour::White => "whitelisted",
        }
    }
}

/// The dimensions a list may hold (the institution is not listed: it is configured).
pub const LISTED: [Dimension; 6] = [
    Dimension::Card,
    Dimension::IdNo,
    Dimension::Phone,
    Dimension::Device,
    Dimension::Ip,
    Dimension::Merchant,
];

#[derive(Debug, Default, Clone)]
pub struct Lists {
    keys: HashMap<(Colour, Dimension), HashSet<u64>>,
    networks: HashMap<Colour, Vec<IpNet>>,
    entries: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListFile {
    #[serde(default)]
    black: Section,
    #[serde(default)]
    white: Section,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Section {
    #[serde(default)]
    card: Vec<toml::Spanned<String>>,
    #[serde(default)]
    id: Vec<toml::Spanned<String>>,
    #[serde(default)]
    phone: Vec<toml::Spanned<String>>,
    #[serde(default)]
    device: Vec<toml::Spanned<String>>,
    #[serde(default)]
    ip: Vec<toml::Spanned<String>>,
    #[serde(default)]
    merchant: Vec<toml::Spanned<String>>,
}

impl Lists {
    /// Adds the entries of one list file (`file` names it in errors).
    pub fn add_file(&mut self, file: &str, text: &str) -> Result<(), LoadError> {
        let parsed: ListFile = toml::from_str(text).map_err(|e| LoadError {
            file: file.to_string(),
            line: e.span().map(|s| line_of(text, s.start)),
            reason: e.message().to_string(),
        })?;
        for (colour, section) in [(Colour::Black, parsed.black), (Colour::White, parsed.white)] {
            for (dimension, values) in [
                (Dimension::Card, section.card),
                (Dimension::IdNo, section.id),
                (Dimension::Phone, section.phone),
                (Dimension::Device, section.device),
                (Dimension::Ip, section.ip),
                (Dimension::Merchant, section.merchant),
            ] {
                for value in values {
                    self.add(colour, dimension, value.get_ref().trim())
                        .map_err(|reason| LoadError {
                            file: file.to_string(),
                            line: Some(line_of(text, value.span().start)),
                            reason,
                        })?;
                }
            }
        }
        Ok(())
    }

    /// Adds one entry; Err says why the value is not acceptable.
    pub fn add(&mut self, colour: Colour, dimension: Dimension, value: &str) -> Result<(), String> {
        if value.is_empty() || value.len() > 128 || value.chars().any(char::is_control) {
            return Err(format!(
                "{} entry \"{value}\" must be 1-128 characters without control characters",
                dimension.name()
            ));
        }
        if dimension == Dimension::Ip {
            let network = match value.parse::<IpNet>() {
                Ok(network) => network,
                Err(_) => IpNet::from(value.parse::<IpAddr>().map_err(|_| {
                    format!("ip entry \"{value}\" is neither an address nor a CIDR range")
                })?),
            };
            self.networks
                .entry(colour)
                .or_default()
                .push(network.trunc());
        } else {
            assert!(
                LISTED.contains(&dimension),
                "{dimension:?} is not a listed dimension"
            );
            self.keys
                .entry((colour, dimension))
                .or_default()
                .insert(subject_key(dimension, value));
        }
        self.entries += 1;
        Ok(())
    }

    /// Adds an entry known only by its subject key (the lists kept in the database).
    pub fn add_key(&mut self, colour: Colour, dimension: Dimension, key: u64) {
        assert!(
            LISTED.contains(&dimension) && dimension != Dimension::Ip,
            "{dimension:?} is not listed by key"
        );
        self.keys
            .entry((colour, dimension))
            .or_default()
            .insert(key);
        self.entries += 1;
    }

    /// Whether the subject with `key` (and, for IPs, `ip`) is on the list of `colour`.
    pub fn contains(
        &self,
        colour: Colour,
        dimension: Dimension,
        key: u64,
        ip: Option<IpAddr>,
    ) -> bool {
        if dimension == Dimension::Ip {
            return ip.is_some_and(|ip| {
                self.networks
                    .get(&colour)
                    .is_some_and(|nets| nets.iter().any(|n| n.contains(&ip)))
            });
        }
        self.keys
            .get(&(colour, dimension))
            .is_some_and(|keys| keys.contains(&key))
    }

    pub fn entries(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cards_and_cidr_ranges_match_and_bad_entries_name_their_line() {
        let mut lists = Lists::default();
        lists
            .add_file(
                "lists/fraud.toml",
                "[black]\ncard = [\"6222021234567890131\"]\nip = [\"10.1.0.0/16\", \"203.0.113.7\"]\n\n[white]\nmerchant = [\"M001\"]\n",
            )
            .unwrap();
        let card = subject_key(Dimension::Card, "6222021234567890131");
        assert!(lists.contains(Colour::Black, Dimension::Card, card, None));
        assert!(!lists.contains(Colour::White, Dimension::Card, card, None));
        assert!(!lists.contains(
            Colour::Black,
            Dimension::Card,
            subject_key(Dimension::Card, "6222021234567890123"),
            None
        ));
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(lists.contains(Colour::Black, Dimension::Ip, 0, ip("10.1.255.3")));
        assert!(!lists.contains(Colour::Black, Dimension::Ip, 0, ip("10.2.0.1")));
        assert!(lists.contains(Colour::Black, Dimension::Ip, 0, ip("203.0.113.7")));
        assert!(!lists.contains(Colour::Black, Dimension::Ip, 0, None));
        assert!(lists.contains(
            Colour::White,
            Dimension::Merchant,
            subject_key(Dimension::Merchant, "M001"),
            None
        ));
        assert_eq!(lists.entries(), 4);

        let error = Lists::default()
            .add_file(
                "lists/bad.toml",
                "[black]\ncard = [\"1\"]\nip = [\n  \"10.0.0.0/8\",\n  \"10.0.0.300\",\n]\n",
            )
            .unwrap_err();
        assert_eq!(error.line, Some(5), "{error}");
        assert!(error.to_string().contains("lists/bad.toml:5"), "{error}");
        assert!(
            error.reason.contains("neither an address nor a CIDR"),
            "{error}"
        );
        let error = Lists::default()
            .add_file("lists/typo.toml", "[black]\ncrad = [\"1\"]\n")
            .unwrap_err();
        assert_eq!(error.line, Some(2), "{error}");
        assert!(error.reason.contains("unknown field `crad`"), "{error}");
    }
}
