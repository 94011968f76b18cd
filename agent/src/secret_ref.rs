//! `secret:NAME[:FIELD]`: how env sinks and `mayfly-agent exec` name a granted secret's
//! value, parsed once; and `credential:NAME:FIELD`, one value of a TTL-bound credential,
//! which env sinks take too. Names may contain `.` but never `:`, so the field after a
//! second colon is unambiguous.

use std::fmt;
use std::str::FromStr;

use crate::state::SecretView;

/// Which part of a secret's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretField {
    /// The value (the password, for a database credential).
    Value,
    /// The user it belongs to (alternating-users secrets change it on every rotation).
    Username,
    /// The version id.
    Version,
}

/// A reference to one field of a granted secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub name: String,
    pub field: SecretField,
}

#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretRefError {
    #[error(
        "`{0}` is not a secret reference: write secret:NAME, secret:NAME:username or secret:NAME:version"
    )]
    NotAReference(String),
    #[error("`{0}`: a secret name is 1-128 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("`{0}`: the field after the name must be value, password, username or version")]
    BadField(String),
    #[error(
        "secret `{0}` is not valid UTF-8 text, so it cannot go into an environment variable or template"
    )]
    NotText(String),
    #[error(
        "`{0}` is neither secret:NAME[:FIELD] nor credential:NAME:FIELD (FIELD: a value such as username or password, lease_id or expires_at)"
    )]
    NotAValueReference(String),
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// One value of a TTL-bound credential: `username`, `password`, `access_key_id`, …, or
/// `lease_id` and `expires_at` (RFC 3339), which every credential has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRef {
    pub name: String,
    pub field: String,
}

impl FromStr for CredentialRef {
    type Err = SecretRefError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let not_one = || SecretRefError::NotAValueReference(text.to_string());
        let rest = text.strip_prefix("credential:").ok_or_else(not_one)?;
        let (name, field) = rest.split_once(':').ok_or_else(not_one)?;
        if !name_ok(name) {
            return Err(SecretRefError::BadName(text.to_string()));
        }
        let field_ok = !field.is_empty()
            && field.len() <= 64
            && field
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
        if !field_ok {
            return Err(not_one());
        }
        Ok(Self {
            name: name.to_string(),
            field: field.to_string(),
        })
    }
}

impl fmt::Display for CredentialRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "credential:{}:{}", self.name, self.field)
    }
}

/// What an env sink's variable holds: a secret's field or a credential's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueRef {
    Secret(SecretRef),
    Credential(CredentialRef),
}

impl FromStr for ValueRef {
    type Err = SecretRefError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.starts_with("credential:") {
            text.parse().map(Self::Credential)
        } else if text.starts_with("secret:") {
            text.parse().map(Self::Secret)
        } else {
            Err(SecretRefError::NotAValueReference(text.to_string()))
        }
    }
}

impl fmt::Display for ValueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret(r) => r.fmt(f),
            Self::Credential(r) => r.fmt(f),
        }
    }
}

impl FromStr for SecretRef {
    type Err = SecretRefError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .strip_prefix("secret:")
            .ok_or_else(|| SecretRefError::NotAReference(text.to_string()))?;
        let (name, field) = match rest.split_once(':') {
            Some((name, field)) => (name, Some(field)),
            None => (rest, None),
        };
        if !name_ok(name) {
            return Err(SecretRefError::BadName(text.to_string()));
        }
        let field = match field {
            None | Some("value") | Some("password") => SecretField::Value,
            Some("username") => SecretField::Username,
            Some("version") => SecretField::Version,
            Some(_) => return Err(SecretRefError::BadField(text.to_string())),
        };
        Ok(Self {
            name: name.to_string(),
            field,
        })
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let field = match self.field {
            SecretField::Value => "",
            SecretField::Username => ":username",
            SecretField::Version => ":version",
        };
        write!(f, "secret:{}{field}", self.name)
    }
}

impl SecretRef {
    /// This reference's field of `secret`, as text.
    pub fn resolve(&self, secret: &SecretView) -> Result<String, SecretRefError> {
        match self.field {
            SecretField::Value => String::from_utf8(secret.value.to_vec())
                .map_err(|_| SecretRefError::NotText(self.name.clone())),
            SecretField::Username => Ok(secret.username.clone()),
            SecretField::Version => Ok(secret.version.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_and_field() {
        let r: SecretRef = "secret:orders.db".parse().unwrap();
        assert_eq!(r.name, "orders.db");
        assert_eq!(r.field, SecretField::Value);
        let r: SecretRef = "secret:orders.db:username".parse().unwrap();
        assert_eq!(r.field, SecretField::Username);
        assert_eq!(r.to_string(), "secret:orders.db:username");
        assert_eq!(
            "secret:a:version".parse::<SecretRef>().unwrap().field,
            SecretField::Version
        );
    }

    #[test]
    fn refuses_what_is_not_a_reference() {
        assert!(matches!(
            "orders-db".parse::<SecretRef>(),
            Err(SecretRefError::NotAReference(_))
        ));
        assert!(matches!(
            "secret:".parse::<SecretRef>(),
            Err(SecretRefError::BadName(_))
        ));
        assert!(matches!(
            "secret:a b".parse::<SecretRef>(),
            Err(SecretRefError::BadName(_))
        ));
        assert!(matches!(
            "secret:a:pin".parse::<SecretRef>(),
            Err(SecretRefError::BadField(_))
        ));
    }

    #[test]
    fn credential_references_need_a_field() {
        let r: ValueRef = "credential:orders-db:username".parse().unwrap();
        assert_eq!(
            r,
            ValueRef::Credential(CredentialRef {
                name: "orders-db".into(),
                field: "username".into()
            })
        );
        assert_eq!(r.to_string(), "credential:orders-db:username");
        assert!(matches!(
            "secret:db".parse::<ValueRef>(),
            Ok(ValueRef::Secret(_))
        ));
        for bad in [
            "credential:orders-db",
            "credential:db:",
            "credential:db:a b",
        ] {
            assert!(
                matches!(
                    bad.parse::<ValueRef>(),
                    Err(SecretRefError::NotAValueReference(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            "credential::password".parse::<ValueRef>(),
            Err(SecretRefError::BadName(_))
        ));
        assert!(matches!(
            "orders-db".parse::<ValueRef>(),
            Err(SecretRefError::NotAValueReference(_))
        ));
    }
}
