//! Certificates for TLS tests, made by the test: a private CA and a server
//! and a client certificate signed by it.

use std::path::{Path, PathBuf};

/// Certificate files for a TLS test: a private CA, the server's
/// certificate for 127.0.0.1 and a client certificate, both signed by it.
#[derive(Debug)]
pub struct Certificates {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub server: (PathBuf, PathBuf),
    /// The client's certificate and key.
    pub client: (PathBuf, PathBuf),
}

/// Writes a new CA, server and client certificate (PEM) into `dir`.
///
/// # Errors
///
/// A certificate cannot be made or a file written.
pub fn certificates(dir: &Path) -> anyhow::Result<Certificates> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, file: &str| {
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        anyhow::Ok((
            write(&format!("{file}.pem"), cert.pem())?,
            write(&format!("{file}-key.pem"), key.serialize_pem())?,
        ))
    };
    Ok(Certificates {
        ca: write("ca.pem", ca_cert.pem())?,
        server: leaf(
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        )?,
        client: leaf(
            vec!["client".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        )?,
    })
}
