//! The Merkle tree over record hashes, pure: RFC 6962 / RFC 9162 section 2.1 with SM3 in place
//! of SHA-256. Leaf hash = SM3(0x00 || record hash), node hash = SM3(0x01 || left || right), so
//! a leaf can never be passed off as an inner node.
//!
//! Owns: the root of a range of record hashes, inclusion proofs (audit paths) and their check.
//! Must never: accept a proof whose length does not match the tree size exactly.

use super::record::{HASH_LEN, Hash};
use crate::crypto::sm3::{self, Sm3};

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

pub fn leaf_hash(record_hash: &Hash) -> Hash {
    let mut hasher = Sm3::new();
    hasher.update(&[LEAF_PREFIX]);
    hasher.update(record_hash);
    hasher.finalize()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sm3::new();
    hasher.update(&[NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize()
}

/// The largest power of two strictly smaller than `n` (n >= 2): where RFC 6962 splits.
fn split_point(n: usize) -> usize {
    debug_assert!(n >= 2);
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH over already-computed leaf hashes. The empty tree's root is SM3 of nothing.
pub fn root_of_leaves(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => sm3::digest(&[]),
        1 => leaves[0],
        n => {
            let k = split_point(n);
            node_hash(&root_of_leaves(&leaves[..k]), &root_of_leaves(&leaves[k..]))
        }
    }
}

/// MTH over record hashes.
pub fn root(record_hashes: &[Hash]) -> Hash {
    let leaves: Vec<Hash> = record_hashes.iter().map(leaf_hash).collect();
    root_of_leaves(&leaves)
}

/// PATH(index, D[n]) of RFC 6962 2.1.1: the sibling hashes from the leaf up to the root.
pub fn audit_path(record_hashes: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= record_hashes.len() {
        return None;
    }
    let leaves: Vec<Hash> = record_hashes.iter().map(leaf_hash).collect();
    let mut path = Vec::new();
    path_of(&leaves, index, &mut path);
    Some(path)
}

fn path_of(leaves: &[Hash], index: usize, path: &mut Vec<Hash>) {
    if leaves.len() <= 1 {
        return;
    }
    let k = split_point(leaves.len());
    if index < k {
        path_of(&leaves[..k], index, path);
        path.push(root_of_leaves(&leaves[k..]));
    } else {
        path_of(&leaves[k..], index - k, path);
        path.push(root_of_leaves(&leaves[..k]));
    }
}

/// The root that `record_hash` at `index` in a tree of `size` leaves and `path` imply
/// (RFC 9162 2.1.3.2), or None when the path has the wrong length for that position.
pub fn root_from_path(record_hash: &Hash, index: u64, size: u64, path: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    let mut fn_ = index;
    let mut sn = size - 1;
    let mut r = leaf_hash(record_hash);
    for p in path {
        if sn == 0 {
            return None;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    (sn == 0).then_some(r)
}

/// Hex of a hash, lowercase: how hashes appear in checkpoints, proofs and reports.
pub fn to_hex(hash: &Hash) -> String {
    hex::encode(hash)
}

pub fn from_hex(text: &str) -> Option<Hash> {
    let bytes = hex::decode(text).ok()?;
    (bytes.len() == HASH_LEN).then(|| {
        let mut hash = [0u8; HASH_LEN];
        hash.copy_from_slice(&bytes);
        hash
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(n: usize) -> Vec<Hash> {
        (0..n).map(|i| sm3::digest(&i.to_be_bytes())).collect()
    }

    #[test]
    fn small_trees_match_the_definition() {
        let h = hashes(3);
        let l: Vec<Hash> = h.iter().map(leaf_hash).collect();
        assert_eq!(root(&h[..1]), l[0]);
        assert_eq!(root(&h[..2]), node_hash(&l[0], &l[1]));
        assert_eq!(root(&h), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
    }

    #[test]
    fn every_path_of_every_size_up_to_40_verifies_and_a_wrong_one_does_not() {
        for size in 1..=40usize {
            let h = hashes(size);
            let expected = root(&h);
            for index in 0..size {
                let path = audit_path(&h, index).unwrap();
                assert_eq!(
                    root_from_path(&h[index], index as u64, size as u64, &path),
                    Some(expected),
                    "size {size} index {index}"
                );
                // Another record at this position, or this record at another position, fails.
                let other = sm3::digest(b"other");
                assert_ne!(
                    root_from_path(&other, index as u64, size as u64, &path),
                    Some(expected)
                );
                if size > 1 {
                    let moved = (index + 1) % size;
                    assert_ne!(
                        root_from_path(&h[index], moved as u64, size as u64, &path),
                        Some(expected)
                    );
                }
                if !path.is_empty() {
                    let mut tampered = path.clone();
                    tampered[0][0] ^= 1;
                    assert_ne!(
                        root_from_path(&h[index], index as u64, size as u64, &tampered),
                        Some(expected)
                    );
                    // A path too short or too long for the tree size is refused outright.
                    assert_eq!(
                        root_from_path(
                            &h[index],
                            index as u64,
                            size as u64,
                            &path[..path.len() - 1]
                        ),
                        None
                    );
                }
                let mut long = path.clone();
                long.push(expected);
                assert_eq!(
                    root_from_path(&h[index], index as u64, size as u64, &long),
                    None
                );
            }
        }
    }

    #[test]
    fn a_leaf_is_not_an_inner_node() {
        // Domain separation: the root of two leaves is not the leaf hash of their concatenation.
        let h = hashes(2);
        let l0 = leaf_hash(&h[0]);
        let l1 = leaf_hash(&h[1]);
        let mut joined = vec![0u8];
        joined.extend_from_slice(&l0);
        joined.extend_from_slice(&l1);
        assert_ne!(root(&h), sm3::digest(&joined));
    }
}
