//! jsonwebtoken's signatures, checked (and, for tests and tools, made) with ring, the
//! crypto library rustls already brings: jsonwebtoken 10+ otherwise needs aws-lc-rs or
//! a second stack of RustCrypto crates. jsonwebtoken parses the token, checks the header
//! algorithm against the allowed ones and the key's family, and validates the claims;
//! this only maps each algorithm to ring's and checks a key is of the family asked for.
//!
//! Keys as jsonwebtoken holds them without its `use_pem` feature: an HMAC secret; an RSA
//! public key as PKCS#1 DER or as its modulus and exponent; an EC or Ed25519 public key
//! as its raw point (the contents of a SubjectPublicKeyInfo's BIT STRING). Private keys
//! (signing) are PKCS#8 DER, or PKCS#1 DER for RSA.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::{hmac, signature as sig};

/// The provider: signatures and keys through ring; no JWK thumbprints.
pub static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: signer,
    verifier_factory: verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes [`PROVIDER`] jsonwebtoken's for this process (once; a provider installed
/// before stays).
pub fn install() {
    let _ = PROVIDER.install_default();
}

fn hmac_of(alg: Algorithm) -> Option<hmac::Algorithm> {
    match alg {
        Algorithm::HS256 => Some(hmac::HMAC_SHA256),
        Algorithm::HS384 => Some(hmac::HMAC_SHA384),
        Algorithm::HS512 => Some(hmac::HMAC_SHA512),
        _ => None,
    }
}

/// ring's verification algorithm for an asymmetric `alg`.
fn verification_of(alg: Algorithm) -> Option<&'static dyn sig::VerificationAlgorithm> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &sig::ED25519,
        _ => return None,
    })
}

fn rsa_parameters_of(alg: Algorithm) -> Option<&'static sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

/// Checks signatures of one algorithm with one key.
struct Verify {
    alg: Algorithm,
    key: DecodingKey,
}

impl Verifier<Vec<u8>> for Verify {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let checked = match (self.key.kind(), hmac_of(self.alg)) {
            (DecodingKeyKind::SecretOrDer(secret), Some(h)) => {
                hmac::verify(&hmac::Key::new(h, secret), msg, signature)
            }
            (DecodingKeyKind::SecretOrDer(public), None) => {
                let alg = verification_of(self.alg).ok_or_else(signature::Error::new)?;
                sig::UnparsedPublicKey::new(alg, public).verify(msg, signature)
            }
            (DecodingKeyKind::RsaModulusExponent { n, e }, _) => {
                let params = rsa_parameters_of(self.alg).ok_or_else(signature::Error::new)?;
                sig::RsaPublicKeyComponents { n, e }.verify(params, msg, signature)
            }
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for Verify {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(Verify {
        alg: *alg,
        key: key.clone(),
    }))
}

/// Signs with one algorithm and one private key.
struct Sign {
    alg: Algorithm,
    key: EncodingKey,
}

impl Signer<Vec<u8>> for Sign {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let der = self.key.as_bytes();
        let rng = SystemRandom::new();
        let failed = |_| signature::Error::new();
        if let Some(h) = hmac_of(self.alg) {
            return Ok(hmac::sign(&hmac::Key::new(h, der), msg).as_ref().to_vec());
        }
        match self.alg.family() {
            AlgorithmFamily::Rsa => {
                let encoding: &'static dyn sig::RsaEncoding = match self.alg {
                    Algorithm::RS256 => &sig::RSA_PKCS1_SHA256,
                    Algorithm::RS384 => &sig::RSA_PKCS1_SHA384,
                    Algorithm::RS512 => &sig::RSA_PKCS1_SHA512,
                    Algorithm::PS256 => &sig::RSA_PSS_SHA256,
                    Algorithm::PS384 => &sig::RSA_PSS_SHA384,
                    _ => &sig::RSA_PSS_SHA512,
                };
                let pair = sig::RsaKeyPair::from_pkcs8(der)
                    .or_else(|_| sig::RsaKeyPair::from_der(der))
                    .map_err(failed)?;
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(encoding, &rng, msg, &mut out)
                    .map_err(|_| signature::Error::new())?;
                Ok(out)
            }
            AlgorithmFamily::Ec => {
                let alg = match self.alg {
                    Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                    _ => &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                };
                let pair = sig::EcdsaKeyPair::from_pkcs8(alg, der, &rng).map_err(failed)?;
                let signed = pair.sign(&rng, msg).map_err(|_| signature::Error::new())?;
                Ok(signed.as_ref().to_vec())
            }
            AlgorithmFamily::Ed => {
                let pair = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(failed)?;
                Ok(pair.sign(msg).as_ref().to_vec())
            }
            AlgorithmFamily::Hmac => Err(signature::Error::new()),
        }
    }
}

impl JwtSigner for Sign {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(Sign {
        alg: *alg,
        key: key.clone(),
    }))
}
