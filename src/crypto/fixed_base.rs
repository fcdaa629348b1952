//! SM2 signature verification with precomputed multiples of the generator and of the signer's
//! public key.
//!
//! Owns the verification equation of GB/T 32918.2 (section 7): `t = r + s`, `(x1, y1) = [s]G +
//! [t]P`, valid iff `r == e + x1 (mod n)`. RustCrypto's `sm2` computes `[s]G + [t]P` with a
//! constant-time double-and-add (about 256 doublings); here both points have tables of their
//! multiples, built once per key, so one verification is about 130 point additions and 4
//! doublings. A payment institution's key is fixed for months and verified thousands of times a
//! second, which is what pays for the table (33 x 8 points, about 25 KiB per key).
//!
//! Variable time is safe here and only here: every input of a verification (message, signature,
//! public key) is public. Must never: be used with a secret scalar (signing and decryption stay
//! in the constant-time library code).

use std::sync::LazyLock;

use ::sm2::dsa::Signature;
use ::sm2::elliptic_curve::Group;
use ::sm2::elliptic_curve::ops::Reduce;
use ::sm2::elliptic_curve::point::AffineCoordinates;
use ::sm2::elliptic_curve::sec1::ToSec1Point;
use ::sm2::{FieldBytes, ProjectivePoint, Scalar, Sm2};
use primeorder::{LookupTable, PrimeCurveParams, Radix16Decomposition, Radix16Digits};

/// Scalar bytes; the radix-16 decomposition has two digits per byte plus a carry digit.
const SCALAR_BYTES: usize = 32;
/// One table per pair of radix-16 digits, plus one for the carry digit.
const WINDOWS: usize = SCALAR_BYTES + 1;

/// `windows[i]` holds `1..=8` times `2^(8i) * point`, so a scalar's signed radix-16 digits
/// select their multiples with additions only (the odd digits need four doublings at the end,
/// shared by both tables of a verification).
struct MultiplesTable {
    windows: Box<[LookupTable<ProjectivePoint>; WINDOWS]>,
}

impl MultiplesTable {
    fn new(point: ProjectivePoint) -> MultiplesTable {
        let mut base = point;
        let mut windows = Box::new([LookupTable::<ProjectivePoint>::default(); WINDOWS]);
        for window in windows.iter_mut() {
            *window = LookupTable::new(base);
            for _ in 0..8 {
                base = base.double();
            }
        }
        MultiplesTable { windows }
    }
}

static GENERATOR_TABLE: LazyLock<MultiplesTable> =
    LazyLock::new(|| MultiplesTable::new(ProjectivePoint::generator()));

/// `[a]G + [b]P` in variable time, from the generator's table and `p`'s table.
fn double_multiply_vartime(a: &Scalar, b: &Scalar, p: &MultiplesTable) -> ProjectivePoint {
    let g = &*GENERATOR_TABLE;
    let da = Radix16Decomposition::<Radix16Digits<Sm2>>::new(a);
    let db = Radix16Decomposition::<Radix16Digits<Sm2>>::new(b);
    let mut even = ProjectivePoint::IDENTITY;
    let mut odd = ProjectivePoint::IDENTITY;
    let add = |acc: &mut ProjectivePoint, table: &LookupTable<ProjectivePoint>, digit: i8| {
        if digit != 0 {
            *acc += &table.select_vartime(digit);
        }
    };
    add(&mut even, &g.windows[SCALAR_BYTES], da[2 * SCALAR_BYTES]);
    add(&mut even, &p.windows[SCALAR_BYTES], db[2 * SCALAR_BYTES]);
    for i in 0..SCALAR_BYTES {
        add(&mut even, &g.windows[i], da[2 * i]);
        add(&mut even, &p.windows[i], db[2 * i]);
        add(&mut odd, &g.windows[i], da[2 * i + 1]);
        add(&mut odd, &p.windows[i], db[2 * i + 1]);
    }
    for _ in 0..4 {
        odd = odd.double();
    }
    even + odd
}

/// Verifies SM2 signatures of one public key under one distinguishing id.
pub(super) struct FastVerifier {
    /// `Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA)`, the prefix of every hashed message.
    z: [u8; 32],
    table: MultiplesTable,
}

impl FastVerifier {
    /// `distid` must already be validated (non-empty, at most 8191 bytes).
    pub(super) fn new(public_key: &::sm2::PublicKey, distid: &str) -> FastVerifier {
        let bits = u16::try_from(distid.len() * 8).expect("distid length validated");
        let encoded = public_key.to_sec1_point(false);
        let point = encoded.as_bytes();
        assert_eq!(point.len(), 65, "uncompressed SEC1 point");
        let mut hasher = super::sm3::Sm3::new();
        hasher.update(&bits.to_be_bytes());
        hasher.update(distid.as_bytes());
        hasher.update(&Sm2::EQUATION_A.to_bytes());
        hasher.update(&Sm2::EQUATION_B.to_bytes());
        hasher.update(&Sm2::GENERATOR.0.to_bytes());
        hasher.update(&Sm2::GENERATOR.1.to_bytes());
        hasher.update(&point[1..]);
        FastVerifier {
            z: hasher.finalize(),
            table: MultiplesTable::new(ProjectivePoint::from(*public_key.as_affine())),
        }
    }

    /// GB/T 32918.2 section 7.1, steps B1 to B7. `signature` has r and s in `[1, n-1]` by
    /// construction (the parser refuses anything else).
    pub(super) fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        let mut hasher = super::sm3::Sm3::new();
        hasher.update(&self.z);
        hasher.update(message);
        let digest = hasher.finalize();
        let e = <Scalar as Reduce<FieldBytes>>::reduce(&FieldBytes::from(digest));
        let r = *signature.r();
        let s = *signature.s();
        let t = r + s;
        if bool::from(t.is_zero()) {
            return false;
        }
        let point = double_multiply_vartime(&s, &t, &self.table);
        if bool::from(point.is_identity()) {
            return false;
        }
        let x = point.to_affine().x();
        r == e + <Scalar as Reduce<FieldBytes>>::reduce(&x)
    }
}
