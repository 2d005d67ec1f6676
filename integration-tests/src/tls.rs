//! Certificates made at run time (rcgen) for hubs that serve TLS in the tests and the soak: a
//! self-signed certificate for the loopback names, which a client trusts by adding it as a root.

use std::io;
use std::path::{Path, PathBuf};

use tether_transport::hub::HubConfigBuilder;
use tether_transport::TransportConfigBuilder;

/// A self-signed certificate and its private key, both PEM.
#[derive(Clone)]
pub struct TestCert {
    /// The certificate (also the root a client must trust).
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl TestCert {
    /// A certificate valid for `localhost` and `127.0.0.1` (the names hubs, proxies and
    /// clients use on loopback).
    pub fn localhost() -> Self {
        Self::for_names(&["localhost", "127.0.0.1"])
    }

    /// A certificate valid for these names (DNS names or IP addresses) only.
    pub fn for_names(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let made = rcgen::generate_simple_self_signed(names).expect("rcgen makes a certificate");
        TestCert {
            cert_pem: made.cert.pem(),
            key_pem: made.signing_key.serialize_pem(),
        }
    }

    /// `hub` serving TLS with this certificate.
    pub fn serve(&self, hub: HubConfigBuilder) -> HubConfigBuilder {
        hub.tls(self.cert_pem.clone(), self.key_pem.clone())
    }

    /// `client` trusting this certificate (besides the built-in roots).
    pub fn trust(&self, client: TransportConfigBuilder) -> TransportConfigBuilder {
        client.tls_root_certificates(self.cert_pem.clone())
    }

    /// Writes `hub.crt` and `hub.key` into `dir` (for hub processes configured by path or by
    /// `TETHER_HUB_TLS_CERT` / `TETHER_HUB_TLS_KEY`); returns their paths.
    pub fn write_to(&self, dir: &Path) -> io::Result<(PathBuf, PathBuf)> {
        let (cert, key) = (dir.join("hub.crt"), dir.join("hub.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        std::fs::write(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

impl std::fmt::Debug for TestCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCert").finish_non_exhaustive()
    }
}
