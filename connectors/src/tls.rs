//! TLS for the connectors that speak it themselves (WebSocket clients, the schema
//! registry): OpenSSL through `native-tls`, trusting the system's certificate authorities
//! and those of a PEM file the statement names. (Kafka's TLS is librdkafka's own.)

use laminardb_engine::{Error, Result};

/// A TLS client that checks servers against the system's authorities and those in the
/// PEM file `ca` (named in errors as the option `option`).
pub(crate) fn connector(ca: Option<&str>, option: &str) -> Result<native_tls::TlsConnector> {
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(path) = ca {
        for certificate in pem_certificates(path, option)? {
            builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| Error::connector(format!("setting up TLS: {e}")))
}

/// Every certificate of the PEM file at `path`.
fn pem_certificates(path: &str, option: &str) -> Result<Vec<native_tls::Certificate>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::connector(format!("reading {option} '{path}': {e}")))?;
    const END: &str = "-----END CERTIFICATE-----";
    let certificates: Vec<native_tls::Certificate> = text
        .split_inclusive(END)
        .filter(|block| block.contains(END))
        .map(|block| {
            native_tls::Certificate::from_pem(block.trim_start().as_bytes())
                .map_err(|e| Error::connector(format!("a certificate in {option} '{path}': {e}")))
        })
        .collect::<Result<_>>()?;
    if certificates.is_empty() {
        return Err(Error::connector(format!("{option} '{path}' holds no PEM certificate")));
    }
    Ok(certificates)
}
