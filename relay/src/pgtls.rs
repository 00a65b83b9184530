//! TLS to Postgres with libpq's `sslmode` meanings, for both of the relay's connections.
//!
//! `postgres.url` may carry what libpq reads and tokio-postgres does not: `sslmode=verify-ca` /
//! `verify-full`, `sslrootcert` (a PEM file, or `system` for the platform's roots), `sslcert` and
//! `sslkey` (a client certificate; the key in PKCS#8 PEM). [`split`] takes those out of the URL
//! (tokio-postgres gets `sslmode=require` for the verifying modes) and [`PgTls::connector`] builds
//! the TLS connector that does what the mode says:
//!
//! | sslmode | encrypts | verifies the chain | verifies the host name |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `allow`, `prefer` | if the server offers | no | no |
//! | `require` | yes | only with `sslrootcert` (as libpq) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |

use std::path::PathBuf;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told (it knows disable/prefer/require; TLS itself is ours).
    fn for_tokio_postgres(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow | SslMode::Prefer => "prefer",
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
        }
    }
}

/// Where trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file (one or more certificates).
    File(PathBuf),
    /// The platform's trust store (`sslrootcert=system`).
    System,
}

/// Where and how to connect: tokio-postgres's configuration (hosts, user, database, timeouts)
/// and the TLS it cannot express.
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: PgTls,
}

impl PgTarget {
    /// `config` with the TLS its own `sslmode` gives (libpq's prefer/require: no verification).
    pub fn unverified(config: tokio_postgres::Config) -> PgTarget {
        let tls = PgTls::unverified(config.get_ssl_mode());
        PgTarget { config, tls }
    }
}

/// The TLS settings of `postgres.url`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Splits `postgres.url` into what tokio-postgres reads and the TLS settings. Errors name the
/// parameter and the fix.
pub fn split(url: &str) -> Result<(String, PgTls), String> {
    let mut tls = PgTls::default();
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                tls.mode = SslMode::parse(value).ok_or_else(|| {
                    format!(
                        "sslmode={value} is not a libpq sslmode; use disable, allow, prefer, \
                         require, verify-ca or verify-full"
                    )
                })?;
            }
            "sslrootcert" => {
                tls.root_cert = Some(if value == "system" {
                    RootCert::System
                } else {
                    RootCert::File(PathBuf::from(value))
                });
            }
            "sslcert" => tls.cert = Some(PathBuf::from(value)),
            "sslkey" => tls.key = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if let Some((base, query)) = url.split_once('?').filter(|_| url.contains("://")) {
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(k, &percent_decode(v))? {
                kept.push(pair.to_owned());
            }
        }
        kept.push(format!("sslmode={}", tls.mode.for_tokio_postgres()));
        format!("{base}?{}", kept.join("&"))
    } else if url.contains("://") {
        url.to_owned()
    } else {
        let pairs = conninfo_pairs(url)
            .ok_or_else(|| "postgres.url is neither a URL nor key=value pairs".to_owned())?;
        let mut kept = Vec::new();
        for (k, v) in pairs {
            if !take(&k, &v)? {
                kept.push(conninfo_pair(&k, &v));
            }
        }
        kept.push(format!("sslmode={}", tls.mode.for_tokio_postgres()));
        kept.join(" ")
    };
    if tls.cert.is_some() != tls.key.is_some() {
        return Err("sslcert and sslkey go together: name both files, or neither".into());
    }
    if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root_cert.is_none() {
        let default = std::env::var("HOME")
            .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
            .ok()
            .filter(|p| p.exists());
        match default {
            Some(p) => tls.root_cert = Some(RootCert::File(p)),
            None => {
                return Err(format!(
                    "sslmode={} needs the certificate authority to trust: add \
                     sslrootcert=/path/to/root.crt (or sslrootcert=system) to postgres.url",
                    tls.mode.as_str()
                ));
            }
        }
    }
    Ok((rest, tls))
}

impl PgTls {
    /// Settings from tokio-postgres's own `sslmode` (no verification): for callers that only
    /// have a parsed configuration.
    pub fn unverified(mode: tokio_postgres::config::SslMode) -> PgTls {
        PgTls {
            mode: match mode {
                tokio_postgres::config::SslMode::Disable => SslMode::Disable,
                tokio_postgres::config::SslMode::Require => SslMode::Require,
                _ => SslMode::Prefer,
            },
            ..PgTls::default()
        }
    }

    /// Whether the server's certificate chain is checked.
    pub fn verifies_chain(&self) -> bool {
        match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => self.root_cert.is_some(),
            _ => false,
        }
    }

    /// The connector for this mode; errors name the file and what is wrong with it.
    pub fn connector(&self) -> Result<native_tls::TlsConnector, String> {
        let mut b = native_tls::TlsConnector::builder();
        if self.verifies_chain() {
            if let Some(RootCert::File(path)) = &self.root_cert {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                let certs = pem_blocks(&pem, "CERTIFICATE");
                if certs.is_empty() {
                    return Err(format!(
                        "sslrootcert {}: no PEM certificate in it",
                        path.display()
                    ));
                }
                for c in certs {
                    let cert = native_tls::Certificate::from_pem(&c)
                        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                    b.add_root_certificate(cert);
                }
                b.disable_built_in_roots(true);
            }
            b.danger_accept_invalid_hostnames(self.mode != SslMode::VerifyFull);
        } else {
            // libpq: prefer and require (without a root certificate) encrypt, verify nothing.
            b.danger_accept_invalid_certs(true);
            b.danger_accept_invalid_hostnames(true);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let cert_pem =
                std::fs::read(cert).map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
            let key_pem =
                std::fs::read(key).map_err(|e| format!("sslkey {}: {e}", key.display()))?;
            let identity = native_tls::Identity::from_pkcs8(&cert_pem, &key_pem).map_err(|e| {
                format!(
                    "sslcert/sslkey: {e}; the key must be PKCS#8 PEM (convert with: openssl \
                     pkcs8 -topk8 -nocrypt -in {} -out key.pk8.pem)",
                    key.display()
                )
            })?;
            b.identity(identity);
        }
        b.build().map_err(|e| format!("TLS: {e}"))
    }
}

/// Each `-----BEGIN {label}-----` block of `pem`, whole.
fn pem_blocks(pem: &[u8], label: &str) -> Vec<Vec<u8>> {
    let text = String::from_utf8_lossy(pem);
    let (begin, end) = (
        format!("-----BEGIN {label}-----"),
        format!("-----END {label}-----"),
    );
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(start) = rest.find(&begin) {
        let Some(stop) = rest[start..].find(&end) else {
            break;
        };
        let block_end = start + stop + end.len();
        out.push(rest.as_bytes()[start..block_end].to_vec());
        rest = &rest[block_end..];
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key=value` for a key/value connection string, the value quoted when it must be.
pub fn conninfo_pair(key: &str, value: &str) -> String {
    if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        format!(
            "{key}='{}'",
            value.replace('\\', "\\\\").replace('\'', "\\'")
        )
    } else {
        format!("{key}={value}")
    }
}

/// The `key = value` pairs of a libpq key/value connection string (spaces around `=`, values
/// in single quotes with backslash escapes); `None` when it is malformed.
pub fn conninfo_pairs(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') || key.is_empty() {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_leave_the_url_and_the_mode_maps_for_tokio_postgres() {
        let (url, tls) = split(
            "postgres://u:p@db:5432/app?sslmode=verify-full&sslrootcert=/etc/ca%20dir/root.crt\
             &application_name=r",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p@db:5432/app?application_name=r&sslmode=require"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(
            tls.root_cert,
            Some(RootCert::File("/etc/ca dir/root.crt".into()))
        );
        assert!(url.parse::<tokio_postgres::Config>().is_ok());

        let (kv, tls) =
            split("host=db user=u sslmode=verify-ca sslrootcert=system password='a b'").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert, Some(RootCert::System));
        let parsed: tokio_postgres::Config = kv.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"a b"[..]));
        assert_eq!(
            parsed.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );

        let (url, tls) = split("postgres://u@db/app").unwrap();
        assert_eq!(tls, PgTls::default());
        assert_eq!(url, "postgres://u@db/app");

        assert!(
            split("postgres://u@db/app?sslmode=verify-ful")
                .unwrap_err()
                .contains("libpq")
        );
        assert!(
            split("postgres://u@db/app?sslcert=/c.pem")
                .unwrap_err()
                .contains("together")
        );
    }

    #[test]
    fn require_verifies_only_with_a_root_certificate() {
        let mut tls = PgTls {
            mode: SslMode::Require,
            ..PgTls::default()
        };
        assert!(!tls.verifies_chain());
        tls.root_cert = Some(RootCert::System);
        assert!(tls.verifies_chain());
        assert!(!PgTls::default().verifies_chain());
    }
}
