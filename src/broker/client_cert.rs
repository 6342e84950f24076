//! Client certificates (mutual TLS, `embedded.tls.client_ca_file`): the verifier the TLS
//! and secure WebSocket listeners ask clients for a certificate with, and the username a
//! verified certificate gives (`username_from`).
//!
//! rustls verifies the certificate during the handshake (its chain to one of the CAs, its
//! dates, its key usage); a client whose certificate fails, or that sends none where one
//! is required, never reaches MQTT. What is left here is reading a name out of a
//! certificate that is already verified: the subject's common name, with a few lines of
//! DER over the subject rustls-webpki hands out, or a subject alternative name, with
//! rustls-webpki's own iterators (the parser rustls verified it with).

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::listener::ListenError;
use crate::config::plan::ClientAuthPlan;
use crate::config::raw::CertName;
use crate::der::element as der;

/// Who a TLS handshake says the client is, for its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertUser {
    /// No name comes from a certificate (no `username_from`, or no certificate where none
    /// is required): the CONNECT's username and password log in, as without TLS.
    None,
    /// The verified certificate's name: the client's username, with no password needed.
    Name(String),
    /// A verified certificate without the name `username_from` takes: the CONNECT is
    /// refused (bad username or password, as Mosquitto does).
    Unnamed(CertName),
}

/// The verifier of client certificates: chains to the CAs of `client_ca_file`; a
/// client without a certificate is let through to its login unless one is required.
pub fn verifier(plan: &ClientAuthPlan) -> Result<Arc<dyn ClientCertVerifier>, ListenError> {
    let field_error = |message| ListenError::ClientCa { message };
    let roots = crate::config::preflight::client_cas(&plan.ca_file).map_err(field_error)?;
    let builder = WebPkiClientVerifier::builder(Arc::new(roots));
    let builder = if plan.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|e| field_error(format!("{}: {e}", plan.ca_file.display())))
}

/// The username the client's verified certificate gives, after the handshake on `tls`.
pub fn user(tls: &rustls::ServerConnection, from: Option<CertName>) -> CertUser {
    let (Some(from), Some(cert)) = (from, tls.peer_certificates().and_then(|c| c.first())) else {
        return CertUser::None;
    };
    match name_of(cert, from) {
        Some(name) => CertUser::Name(name),
        None => CertUser::Unnamed(from),
    }
}

/// What `from` names, for messages.
pub fn describe(from: CertName) -> &'static str {
    match from {
        CertName::Cn => "common name (CN)",
        CertName::San => "DNS or URI subject alternative name",
    }
}

/// The subject's first common name, or the first DNS name among the subject alternative
/// names (else the first URI); None when it has none usable as a username (empty, or
/// holding U+0000, which MQTT strings may not).
fn name_of(cert: &CertificateDer<'_>, from: CertName) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let name = match from {
        CertName::Cn => common_name(cert.subject())?,
        CertName::San => {
            // A wildcard names many hosts, no one client.
            let mut dns = cert.valid_dns_names().filter(|n| !n.contains('*'));
            dns.next()
                .or_else(|| cert.valid_uri_names().next())?
                .to_owned()
        }
    };
    (!name.is_empty() && !name.contains('\0')).then_some(name)
}

/// DER object identifier of the common name attribute (2.5.4.3).
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The first common name of a subject (an RDNSequence's contents: SETs of SEQUENCEs of an
/// OID and a string).
fn common_name(subject: &[u8]) -> Option<String> {
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (0x31, set, rest) = der(rdns)? else {
            return None;
        };
        rdns = rest;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (0x30, attribute, rest) = der(attributes)? else {
                return None;
            };
            attributes = rest;
            if let (0x06, COMMON_NAME, value) = der(attribute)? {
                let (tag, text, _) = der(value)?;
                return string(tag, text);
            }
        }
    }
    None
}

/// A directory string as text: UTF8String, PrintableString, IA5String, a TeletexString
/// that is valid UTF-8, or BMPString (UTF-16).
fn string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        0x0C | 0x13 | 0x16 | 0x14 => String::from_utf8(bytes.to_vec()).ok(),
        0x1E if bytes.len().is_multiple_of(2) => {
            let units = bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units).collect::<Result<_, _>>().ok()
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rustls::pki_types::pem::PemObject as _;

    use super::*;

    /// Subject `O=Fleet, CN=device-7, OU=sensors`; SAN (in this order)
    /// `URI:spiffe://fleet/d7, email:d7@fleet.example, DNS:d7.fleet.example`.
    pub(crate) const CN_AND_SAN: &str = "-----BEGIN CERTIFICATE-----
MIIB3TCCAYKgAwIBAgIUcTehj22mghFJ/4X6qzL7+mdx+hIwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdW5pdCBDQTAgFw0yNjEyMDIxMzIxMjVaGA8yMTI2MTEwODEz
MjEyNVowNTEOMAwGA1UECgwFRmxlZXQxETAPBgNVBAMMCGRldmljZS03MRAwDgYD
VQQLDAdzZW5zb3JzMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEjUO4CAUK7V2x
dsh8bEDDdq4HDyOCBk5a+B40hEq079XzdrViB+qh2aTTNO2OqdHQ4VWD73yAE721
/fNbHe9p6qOBkDCBjTBABgNVHREEOTA3hhFzcGlmZmU6Ly9mbGVldC9kN4EQZDdA
ZmxlZXQuZXhhbXBsZYIQZDcuZmxlZXQuZXhhbXBsZTAJBgNVHRMEAjAAMB0GA1Ud
DgQWBBSTTUiaSYmsDkzUMmxJATJQBJ6VYDAfBgNVHSMEGDAWgBQimCBYPvoyWtgG
/KRF69Y1jNNfBjAKBggqhkjOPQQDAgNJADBGAiEAoFM4Orrwk7HhgIf2J1oUlOLC
qfyY+z6G6/p9rIYwDbkCIQC/akL3d071bVU3bg7knz0B/CZp65l1Xy8YuHNOF3qb
7A==
-----END CERTIFICATE-----";

    /// Subject `O=Fleet` (no CN); SAN `URI:spiffe://fleet/d8, IP:10.0.0.8`.
    const URI_ONLY: &str = "-----BEGIN CERTIFICATE-----
MIIBmDCCAT2gAwIBAgIUcTehj22mghFJ/4X6qzL7+mdx+hMwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdW5pdCBDQTAgFw0yNjEyMDIxMzIxMjZaGA8yMTI2MTEwODEz
MjEyNlowEDEOMAwGA1UECgwFRmxlZXQwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AATqlpnns/k4rBlwAzZJ1jtBW8iIyD600CEn6VPkkD3AiS2KRgYvCm+K+XjV+NA8
dKaLlWiNyi64Wmwj/N3tgFwYo3EwbzAiBgNVHREEGzAZhhFzcGlmZmU6Ly9mbGVl
dC9kOIcECgAACDAJBgNVHRMEAjAAMB0GA1UdDgQWBBRvcZ78AfTwoEfrc0atM6kz
LUlyNTAfBgNVHSMEGDAWgBQimCBYPvoyWtgG/KRF69Y1jNNfBjAKBggqhkjOPQQD
AgNJADBGAiEA/Gm1AhEIh/ngmlzkJN9WrnIr5uD4TZ5x2dqF65KVp+4CIQC9YCRI
6Z1AeBIB09vaLGLU2MnYO8miaD9CEdhzAqKjcQ==
-----END CERTIFICATE-----";

    /// Subject `CN=gerät-9` (a UTF8String); no SAN.
    const UTF8_CN: &str = "-----BEGIN CERTIFICATE-----
MIIBdjCCARygAwIBAgIUcTehj22mghFJ/4X6qzL7+mdx+hQwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdW5pdCBDQTAgFw0yNjEyMDIxMzIxMjZaGA8yMTI2MTEwODEz
MjEyNlowEzERMA8GA1UEAwwIZ2Vyw6R0LTkwWTATBgcqhkjOPQIBBggqhkjOPQMB
BwNCAATypuqL0u/1bb49KtwQSFgq/ukEVAZ6nqoZUW96fsBuyX8lZsJ1k7oGltKC
WG8amYIxBgk+9kBqAEFtIfKiurioo00wSzAJBgNVHRMEAjAAMB0GA1UdDgQWBBQZ
BRoKeECTlraR89d3sbB3jbUfUTAfBgNVHSMEGDAWgBQimCBYPvoyWtgG/KRF69Y1
jNNfBjAKBggqhkjOPQQDAgNIADBFAiEA9oen0f0zDB5cSPen0+lYCNIiuiItwiBu
w0v3412oaykCICuZvTeqMNkOv68xbh0Hi6e/HErrsIe01APg9r2YqBes
-----END CERTIFICATE-----";

    fn name(pem: &str, from: CertName) -> Option<String> {
        name_of(
            &CertificateDer::from_pem_slice(pem.as_bytes()).unwrap(),
            from,
        )
    }

    #[test]
    fn the_common_name_is_the_subjects_cn_wherever_it_stands() {
        assert_eq!(name(CN_AND_SAN, CertName::Cn).as_deref(), Some("device-7"));
        assert_eq!(name(UTF8_CN, CertName::Cn).as_deref(), Some("gerät-9"));
        assert_eq!(name(URI_ONLY, CertName::Cn), None);
    }

    #[test]
    fn the_san_is_the_first_dns_name_else_the_first_uri() {
        // The URI and the e-mail address come first in CN_AND_SAN: the DNS name wins.
        assert_eq!(
            name(CN_AND_SAN, CertName::San).as_deref(),
            Some("d7.fleet.example")
        );
        assert_eq!(
            name(URI_ONLY, CertName::San).as_deref(),
            Some("spiffe://fleet/d8")
        );
        assert_eq!(name(UTF8_CN, CertName::San), None);
    }

    #[test]
    fn directory_strings_decode_and_malformed_der_is_no_name() {
        assert_eq!(string(0x13, b"dev-1").as_deref(), Some("dev-1"));
        assert_eq!(
            string(0x1E, &[0, b'd', 0x00, 0xE4]).as_deref(),
            Some("d\u{e4}")
        );
        assert_eq!(string(0x1E, &[0, b'd', 0]), None);
        assert_eq!(string(0x0C, &[0xFF]), None);
        assert_eq!(string(0x04, b"octets"), None);
        // A CN attribute whose length runs past the end; a long-form length of 0 bytes.
        assert_eq!(
            common_name(&[
                0x31, 0x09, 0x30, 0x07, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0C, 0x05
            ]),
            None
        );
        assert_eq!(der(&[0x30, 0x80]), None);
        // Long-form lengths are read.
        let mut long = vec![0x0C, 0x81, 200];
        long.extend([b'a'; 200]);
        assert_eq!(
            der(&long).map(|(t, c, r)| (t, c.len(), r.len())),
            Some((0x0C, 200, 0))
        );
    }
}
