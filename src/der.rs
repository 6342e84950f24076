//! A few lines of DER (ASN.1's distinguished encoding), enough to walk the structures
//! mqbridge reads out of what rustls or a PEM file hands it: a certificate's subject
//! ([`crate::broker::client_cert`]) and a public key's SubjectPublicKeyInfo
//! ([`crate::config::auth`], JWT keys).

/// One DER element of `input`: its tag, its contents, and what follows it.
pub fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes.iter().fold(0usize, |l, &b| (l << 8) | b as usize);
        (len, rest)
    };
    (rest.len() >= len).then(|| {
        let (contents, rest) = rest.split_at(len);
        (tag, contents, rest)
    })
}
