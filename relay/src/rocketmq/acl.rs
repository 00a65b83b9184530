//! RocketMQ ACL signing (AccessKey/SecretKey), as Apache RocketMQ's `AclClientRPCHook` does it
//! and as brokers and name servers with authentication on check it (Java 4.x ACL 1.0 with
//! `plain_acl.yml`, 5.x ACL 2.0 users, rocketmq-rust's `authenticationEnabled`):
//!
//! every request carries `AccessKey` and `Signature` in its `extFields`, where the signature is
//! `base64(HMAC-SHA1(secret key, the values of all other extFields in byte order of their keys,
//! concatenated, then the body))`. Responses are not signed.

use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;

use super::remoting::Command;

pub const ACCESS_KEY: &str = "AccessKey";
pub const SIGNATURE: &str = "Signature";

/// An access key and its secret; `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"***")
            .finish()
    }
}

impl Credentials {
    /// The credentials `rocketmq.access_key`/`secret_key` name; `None` without ACL (the
    /// configuration refuses one without the other at load).
    pub fn of(config: &crate::config::RocketmqConfig) -> Option<Credentials> {
        Credentials::from_config(&config.access_key, &config.secret_key)
            .ok()
            .flatten()
    }

    /// `None` when both are empty (no ACL); an error when only one is set.
    pub fn from_config(access_key: &str, secret_key: &str) -> Result<Option<Credentials>, String> {
        match (access_key.is_empty(), secret_key.is_empty()) {
            (true, true) => Ok(None),
            (false, false) => Ok(Some(Credentials {
                access_key: access_key.to_owned(),
                secret_key: secret_key.to_owned(),
            })),
            (false, true) => Err(
                "rocketmq.access_key is set but rocketmq.secret_key is empty; \
                 set RELAY_ROCKETMQ__SECRET_KEY (or RELAY_ROCKETMQ__SECRET_KEY_FILE) too, or \
                 clear the access key if the brokers do not check ACLs"
                    .into(),
            ),
            (true, false) => Err(
                "rocketmq.secret_key is set but rocketmq.access_key is empty; \
                 set RELAY_ROCKETMQ__ACCESS_KEY to the user the secret belongs to"
                    .into(),
            ),
        }
    }

    /// Adds `AccessKey` and `Signature` to a request (anything already there is replaced).
    pub fn sign(&self, cmd: &mut Command) -> Result<(), String> {
        cmd.ext.remove(SIGNATURE);
        cmd.ext.insert(ACCESS_KEY.into(), self.access_key.clone());
        let signature = self.signature(cmd)?;
        cmd.ext.insert(SIGNATURE.into(), signature);
        Ok(())
    }

    fn signature(&self, cmd: &Command) -> Result<String, String> {
        let mut fields: Vec<(&String, &String)> =
            cmd.ext.iter().filter(|(k, _)| *k != SIGNATURE).collect();
        fields.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let fail = |e: openssl::error::ErrorStack| format!("cannot sign a RocketMQ request: {e}");
        let key = PKey::hmac(self.secret_key.as_bytes()).map_err(fail)?;
        let mut signer = Signer::new(MessageDigest::sha1(), &key).map_err(fail)?;
        for (_, value) in fields {
            signer.update(value.as_bytes()).map_err(fail)?;
        }
        signer.update(&cmd.body).map_err(fail)?;
        let mac = signer.sign_to_vec().map_err(fail)?;
        Ok(openssl::base64::encode_block(&mac))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn creds() -> Credentials {
        Credentials::from_config("rocketmq", "12345678")
            .unwrap()
            .unwrap()
    }

    #[test]
    fn signs_sorted_field_values_then_the_body_with_hmac_sha1() {
        let ext = HashMap::from([
            ("topic".to_string(), "T".to_string()),
            ("b".to_string(), "2".to_string()),
            ("A".to_string(), "1".to_string()),
        ]);
        let mut cmd = Command::request(10, ext).with_body(&b"body"[..]);
        creds().sign(&mut cmd).unwrap();
        assert_eq!(cmd.field(ACCESS_KEY), "rocketmq");
        // Keys in byte order: A, AccessKey, b, topic → "1" "rocketmq" "2" "T", then the body.
        // Reference: printf '1rocketmq2Tbody' | openssl dgst -sha1 -hmac 12345678 -binary | base64
        let expected = {
            let key = PKey::hmac(b"12345678").unwrap();
            let mut s = Signer::new(MessageDigest::sha1(), &key).unwrap();
            s.update(b"1rocketmq2Tbody").unwrap();
            openssl::base64::encode_block(&s.sign_to_vec().unwrap())
        };
        assert_eq!(cmd.field(SIGNATURE), expected);
        assert_eq!(expected, "9Cc1rKJg0rs9Rg6HhEGmdvyABKw=");
        // Signing again (a retried request) gives the same fields.
        let before = cmd.clone();
        creds().sign(&mut cmd).unwrap();
        assert_eq!(cmd, before);
    }

    #[test]
    fn a_half_configured_key_is_an_error_and_the_secret_is_not_printed() {
        assert_eq!(Credentials::from_config("", ""), Ok(None));
        assert!(
            Credentials::from_config("a", "")
                .unwrap_err()
                .contains("secret_key")
        );
        assert!(
            Credentials::from_config("", "s")
                .unwrap_err()
                .contains("access_key")
        );
        assert!(!format!("{:?}", creds()).contains("12345678"));
    }
}
