//! TLS on both ends, with rustls and its `ring` crypto provider (chosen explicitly, so that no
//! process-wide default provider is needed and no aws-lc C build is pulled in).
//!
//! * Client: [`ClientTrust`] — the roots a client checks a `wss://` hub's certificate against:
//!   the built-in webpki (Mozilla) roots, plus extra CA certificates from PEM, DER or a file.
//!   Built by [`TransportConfigBuilder`](crate::TransportConfigBuilder); a configuration with
//!   only `ws://` endpoints builds no TLS client at all.
//! * Hub: [`HubTls`] — the hub's certificate chain and private key, checked when the
//!   [`HubConfig`](crate::hub::HubConfig) is built (bad PEM, or a key that does not match the
//!   certificate, is [`TransportError::InvalidConfig`]).
//! * [`HandshakeFailure::of`] sorts a failed client handshake: a certificate the client does not
//!   trust is [`TransportError::TlsCertificate`] (permanent: the connection goes `Failed`), any
//!   other TLS failure [`TransportError::TlsHandshake`] (retryable).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use serde::ser::SerializeStruct;

use crate::error::TransportError;

/// The crypto provider of every TLS configuration Tether builds.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where certificate or key material comes from: bytes given to a builder, or a file read when
/// the builder builds. `field` names the setting in errors (a builder method or a variable).
#[derive(Clone)]
pub(crate) struct Material {
    field: &'static str,
    source: Source,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            Source::Pem(b) => format!("{} bytes of PEM", b.len()),
            Source::Der(b) => format!("{} bytes of DER", b.len()),
            Source::PemFile(path) => format!("PEM file {}", path.display()),
        };
        write!(f, "{}: {source}", self.field)
    }
}

#[derive(Clone)]
enum Source {
    Pem(Vec<u8>),
    Der(Vec<u8>),
    PemFile(PathBuf),
}

impl Material {
    pub(crate) fn pem(field: &'static str, bytes: impl Into<Vec<u8>>) -> Self {
        Material {
            field,
            source: Source::Pem(bytes.into()),
        }
    }

    pub(crate) fn der(field: &'static str, bytes: impl Into<Vec<u8>>) -> Self {
        Material {
            field,
            source: Source::Der(bytes.into()),
        }
    }

    pub(crate) fn pem_file(field: &'static str, path: impl Into<PathBuf>) -> Self {
        Material {
            field,
            source: Source::PemFile(path.into()),
        }
    }

    fn invalid(&self, reason: impl std::fmt::Display) -> TransportError {
        let reason = match &self.source {
            Source::PemFile(path) => format!("{}: {reason}", path.display()),
            Source::Pem(_) | Source::Der(_) => reason.to_string(),
        };
        TransportError::InvalidConfig {
            field: self.field,
            reason,
        }
    }

    /// The PEM text (read from the file if it is one); `None` for DER.
    fn pem_bytes(&self) -> Result<Option<std::borrow::Cow<'_, [u8]>>, TransportError> {
        match &self.source {
            Source::Pem(bytes) => Ok(Some(bytes.as_slice().into())),
            Source::PemFile(path) => std::fs::read(path)
                .map(|b| Some(b.into()))
                .map_err(|e| self.invalid(format!("cannot read: {e}"))),
            Source::Der(_) => Ok(None),
        }
    }

    /// Every certificate in it, in order; at least one.
    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, TransportError> {
        let certs = match self.pem_bytes()? {
            Some(pem) => CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.invalid(format!("not valid PEM: {e}")))?,
            None => match &self.source {
                Source::Der(der) => vec![CertificateDer::from(der.clone())],
                _ => unreachable!("pem_bytes is None only for DER"),
            },
        };
        if certs.is_empty() {
            return Err(self.invalid("no CERTIFICATE section in the PEM"));
        }
        Ok(certs)
    }

    /// The private key in it (PKCS#8, PKCS#1 or SEC1).
    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TransportError> {
        match self.pem_bytes()? {
            Some(pem) => PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| self.invalid(format!("no private key in the PEM: {e}"))),
            None => match &self.source {
                Source::Der(der) => PrivateKeyDer::try_from(der.clone())
                    .map_err(|e| self.invalid(format!("not a DER private key: {e}"))),
                _ => unreachable!("pem_bytes is None only for DER"),
            },
        }
    }
}

/// What a client trusts when it connects to a `wss://` endpoint. Part of
/// [`TransportConfig`](crate::TransportConfig); set through the builder's `tls_*` methods.
#[derive(Clone)]
pub struct ClientTrust {
    builtin_roots: bool,
    extra_roots: Vec<CertificateDer<'static>>,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl ClientTrust {
    /// Loads and checks the extra roots; builds the rustls client configuration when `needed`
    /// (some endpoint is `wss://`), which must then have at least one root to trust.
    pub(crate) fn build(
        builtin_roots: bool,
        extra: &[Material],
        needed: bool,
    ) -> Result<Self, TransportError> {
        let mut extra_roots = Vec::new();
        let mut roots = RootCertStore::empty();
        for material in extra {
            for cert in material.certificates()? {
                roots
                    .add(cert.clone())
                    .map_err(|e| material.invalid(format!("not a usable CA certificate: {e}")))?;
                extra_roots.push(cert);
            }
        }
        let config = if needed {
            if builtin_roots {
                roots.extend(
                    actix_tls::connect::rustls_0_23::webpki_roots_cert_store()
                        .roots
                        .iter()
                        .cloned(),
                );
            }
            if roots.is_empty() {
                return Err(TransportError::InvalidConfig {
                    field: "tls_builtin_roots",
                    reason: "a wss:// endpoint needs a root to trust: keep the built-in roots or \
                             add a CA certificate"
                        .into(),
                });
            }
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TransportError::InvalidConfig {
                    field: "tls",
                    reason: e.to_string(),
                })?
                .with_root_certificates(roots)
                .with_no_client_auth();
            // The WebSocket upgrade is an HTTP/1.1 request.
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(ClientTrust {
            builtin_roots,
            extra_roots,
            config,
        })
    }

    /// Whether the built-in webpki (Mozilla) roots are trusted. Default `true`.
    pub fn builtin_roots(&self) -> bool {
        self.builtin_roots
    }

    /// The extra CA certificates trusted besides (or instead of) the built-in roots.
    pub fn extra_roots(&self) -> &[CertificateDer<'static>] {
        &self.extra_roots
    }

    /// The rustls client configuration for `wss://` endpoints; `None` when every endpoint is
    /// `ws://` (no TLS client is built).
    pub fn rustls_config(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.config.as_ref()
    }
}

impl Default for ClientTrust {
    /// The built-in roots only, no TLS client built yet.
    fn default() -> Self {
        ClientTrust {
            builtin_roots: true,
            extra_roots: Vec::new(),
            config: None,
        }
    }
}

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTrust")
            .field("builtin_roots", &self.builtin_roots)
            .field("extra_roots", &self.extra_roots.len())
            .field("enabled", &self.config.is_some())
            .finish()
    }
}

impl serde::Serialize for ClientTrust {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("ClientTrust", 3)?;
        st.serialize_field("builtin_roots", &self.builtin_roots)?;
        st.serialize_field("extra_roots", &self.extra_roots.len())?;
        st.serialize_field("enabled", &self.config.is_some())?;
        st.end()
    }
}

/// The hub's TLS identity: a certificate chain and the private key of its first certificate,
/// checked against each other when built. Set with
/// [`HubConfigBuilder::tls`](crate::hub::HubConfigBuilder::tls) or
/// [`HubConfigBuilder::tls_files`](crate::hub::HubConfigBuilder::tls_files).
#[derive(Clone)]
pub struct HubTls {
    config: Arc<rustls::ServerConfig>,
    chain_len: usize,
}

impl HubTls {
    /// From a PEM certificate chain (leaf first, then intermediates) and a PEM private key
    /// (PKCS#8, PKCS#1 or SEC1).
    ///
    /// ```
    /// # fn demo(chain: &[u8], key: &[u8]) -> Result<(), tether_transport::TransportError> {
    /// let tls = tether_transport::tls::HubTls::from_pem(chain, key)?;
    /// assert!(tls.chain_len() >= 1);
    /// # Ok(()) }
    /// ```
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<Self, TransportError> {
        Self::load(
            &Material::pem("tls_cert", cert_chain),
            &Material::pem("tls_key", key),
        )
    }

    pub(crate) fn load(cert_chain: &Material, key: &Material) -> Result<Self, TransportError> {
        let chain = cert_chain.certificates()?;
        let chain_len = chain.len();
        let key_der = key.private_key()?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| key.invalid(e))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| key.invalid(format!("does not fit the certificate chain: {e}")))?;
        Ok(HubTls {
            config: Arc::new(config),
            chain_len,
        })
    }

    /// Certificates in the chain (the leaf and its intermediates).
    pub fn chain_len(&self) -> usize {
        self.chain_len
    }

    /// The rustls server configuration the listener uses (actix-web adds the ALPN protocols).
    pub fn rustls_config(&self) -> &Arc<rustls::ServerConfig> {
        &self.config
    }
}

impl std::fmt::Debug for HubTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubTls")
            .field("chain_len", &self.chain_len)
            .finish_non_exhaustive()
    }
}

/// How a failed TLS handshake is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The hub's certificate was refused by the client's verifier (unknown issuer, wrong name,
    /// expired, revoked, malformed, or none presented): [`TransportError::TlsCertificate`],
    /// permanent — the same certificate is refused on every attempt until the client's trust or
    /// the hub's certificate changes.
    Certificate,
    /// Anything else (the peer does not speak TLS, sent an alert, offered nothing in common):
    /// [`TransportError::TlsHandshake`], retryable.
    Handshake,
}

impl HandshakeFailure {
    /// Sorts a rustls error from a client handshake.
    pub fn of(error: &rustls::Error) -> Self {
        match error {
            rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType
            | rustls::Error::InvalidCertRevocationList(_) => HandshakeFailure::Certificate,
            _ => HandshakeFailure::Handshake,
        }
    }

    /// The typed error for a handshake with `endpoint` that failed with `error`.
    pub fn error(endpoint: &str, error: &rustls::Error) -> TransportError {
        let (endpoint, reason) = (endpoint.to_owned(), error.to_string());
        match Self::of(error) {
            HandshakeFailure::Certificate => TransportError::TlsCertificate { endpoint, reason },
            HandshakeFailure::Handshake => TransportError::TlsHandshake { endpoint, reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{CertificateError, PeerIncompatible};

    /// A self-signed certificate for localhost and its key (PEM), made at run time.
    fn self_signed() -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    fn field_of<T>(result: Result<T, TransportError>) -> &'static str {
        match result {
            Err(TransportError::InvalidConfig { field, .. }) => field,
            Err(other) => panic!("expected InvalidConfig, got {other:?}"),
            Ok(_) => panic!("expected InvalidConfig, got a valid configuration"),
        }
    }

    #[test]
    fn a_matching_chain_and_key_make_a_hub_identity() {
        let (cert, key) = self_signed();
        let tls = HubTls::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(tls.chain_len(), 1);
    }

    #[test]
    fn bad_hub_material_is_refused_naming_the_setting() {
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        assert_eq!(
            field_of(HubTls::from_pem(b"not pem", key.as_bytes())),
            "tls_cert"
        );
        assert_eq!(
            field_of(HubTls::from_pem(key.as_bytes(), key.as_bytes())),
            "tls_cert",
            "a key where the certificate should be"
        );
        assert_eq!(
            field_of(HubTls::from_pem(cert.as_bytes(), cert.as_bytes())),
            "tls_key",
            "a certificate where the key should be"
        );
        assert_eq!(
            field_of(HubTls::from_pem(cert.as_bytes(), other_key.as_bytes())),
            "tls_key",
            "a key that does not belong to the certificate"
        );
        let missing = HubTls::load(
            &Material::pem_file("TETHER_HUB_TLS_CERT", "/nonexistent/cert.pem"),
            &Material::pem("tls_key", key.as_str()),
        );
        match missing {
            Err(TransportError::InvalidConfig { field, reason }) => {
                assert_eq!(field, "TETHER_HUB_TLS_CERT");
                assert!(reason.contains("/nonexistent/cert.pem"), "{reason}");
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn client_trust_builds_a_tls_client_only_when_needed() {
        let (cert, _) = self_signed();
        let ws_only = ClientTrust::build(true, &[], false).unwrap();
        assert!(ws_only.rustls_config().is_none());

        let defaults = ClientTrust::build(true, &[], true).unwrap();
        assert!(defaults.rustls_config().is_some());
        assert!(defaults.extra_roots().is_empty());

        let private = ClientTrust::build(
            false,
            &[Material::pem("tls_root_certificates", cert.as_str())],
            true,
        )
        .unwrap();
        assert_eq!(private.extra_roots().len(), 1);
        assert!(!private.builtin_roots());
        let config = private.rustls_config().unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn client_trust_refuses_bad_roots_and_an_empty_trust() {
        let (_, key) = self_signed();
        assert_eq!(
            field_of(ClientTrust::build(false, &[], true)),
            "tls_builtin_roots"
        );
        assert_eq!(
            field_of(ClientTrust::build(
                true,
                &[Material::pem("tls_root_certificates", key.as_str())],
                false
            )),
            "tls_root_certificates",
            "a PEM without a certificate is refused even for ws:// only"
        );
        assert_eq!(
            field_of(ClientTrust::build(
                true,
                &[Material::der(
                    "tls_root_certificate_der",
                    b"garbage".to_vec()
                )],
                true
            )),
            "tls_root_certificate_der"
        );
        assert_eq!(
            field_of(ClientTrust::build(
                true,
                &[Material::pem_file(
                    "TETHER_TLS_CA_FILE",
                    "/nonexistent/ca.pem"
                )],
                true
            )),
            "TETHER_TLS_CA_FILE"
        );
    }

    #[test]
    fn certificate_refusals_are_permanent_other_handshake_failures_retryable() {
        let untrusted = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            HandshakeFailure::of(&untrusted),
            HandshakeFailure::Certificate
        );
        let err = HandshakeFailure::error("wss://h/ws", &untrusted);
        assert!(matches!(err, TransportError::TlsCertificate { .. }));
        assert!(err.is_permanent());

        for cert in [
            CertificateError::Expired,
            CertificateError::NotValidForName,
            CertificateError::BadSignature,
            CertificateError::Revoked,
        ] {
            let e = rustls::Error::InvalidCertificate(cert);
            assert_eq!(
                HandshakeFailure::of(&e),
                HandshakeFailure::Certificate,
                "{e}"
            );
        }
        assert_eq!(
            HandshakeFailure::of(&rustls::Error::NoCertificatesPresented),
            HandshakeFailure::Certificate
        );

        for other in [
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
            rustls::Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered),
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        ] {
            assert_eq!(
                HandshakeFailure::of(&other),
                HandshakeFailure::Handshake,
                "{other}"
            );
            let err = HandshakeFailure::error("wss://h/ws", &other);
            assert!(matches!(err, TransportError::TlsHandshake { .. }));
            assert!(!err.is_permanent());
        }
    }
}
